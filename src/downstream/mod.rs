//! Downstream evaluation: the metrics of the three tasks (`metrics`), the cross-validation
//! folds and label-fraction subsets (`folds`), and the report over a grid of fine-tuning runs
//! (`report`, the grid file and the `metrics.json` schema). docs/DOWNSTREAM.md describes the
//! conventions and file formats; nothing here touches the model.
pub mod finetune;
pub mod folds;
pub mod metrics;
pub mod predict;
pub mod report;

use std::fmt;
use std::str::FromStr;

/// The three downstream tasks of the paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Task {
    /// Classification between two diagnoses (e.g. CN vs AD).
    Diagnosis,
    /// Brain-age regression.
    Age,
    /// Tumour segmentation into the BraTS labels 1, 2, 4.
    Segmentation,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Diagnosis, Task::Age, Task::Segmentation];

    pub fn name(self) -> &'static str {
        match self {
            Task::Diagnosis => "diagnosis",
            Task::Age => "age",
            Task::Segmentation => "segmentation",
        }
    }

    /// The metric the report compares pretrained with scratch on.
    pub fn main_metric(self) -> &'static str {
        match self {
            Task::Diagnosis => "auc",
            Task::Age => "mae",
            Task::Segmentation => "dice_wt",
        }
    }

    /// Whether a larger main metric is better (false for MAE).
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Task::Age)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown task '{s}' (expected diagnosis, age or segmentation)"))
    }
}

/// How the model was initialised before fine-tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Init {
    /// From a pretraining checkpoint.
    Pretrained,
    /// From random initialisation (`--scratch`), the baseline.
    Scratch,
}

impl Init {
    pub fn name(self) -> &'static str {
        match self {
            Init::Pretrained => "pretrained",
            Init::Scratch => "scratch",
        }
    }
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Init {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pretrained" => Ok(Init::Pretrained),
            "scratch" => Ok(Init::Scratch),
            _ => Err(format!(
                "unknown initialisation '{s}' (expected pretrained or scratch)"
            )),
        }
    }
}

/// Checks a label fraction: finite and in (0, 1].
pub fn check_fraction(f: f64) -> Result<f64, String> {
    if f.is_finite() && f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err(format!("label fraction {f} is outside (0, 1]"))
    }
}

/// Task and Init are written as their names in JSON.
macro_rules! serde_by_name {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_by_name!(Task);
serde_by_name!(Init);
