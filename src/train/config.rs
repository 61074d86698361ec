//! The run configuration: a TOML file whose every key is optional (defaults are PAPER.md's
//! method decisions) and whose unknown keys are errors, overridden by the command line, checked
//! once, printed as a table at the start and saved in the run folder.
use crate::model::{ModelConfig, Preset};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Which pretraining stages a run performs.
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stages {
    /// Triplet (encoder), then MEVP (transformer) from the triplet encoder.
    All,
    Triplet,
    Mevp,
}

/// The stage a step belongs to (recorded in checkpoints and metrics).
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Triplet,
    Mevp,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Triplet => "triplet",
            Stage::Mevp => "mevp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Stage::Triplet, Stage::Mevp]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a pretraining run is told. Field order is the order of the saved TOML and of the
/// start-of-run table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub preset: Preset,
    pub stage: Stages,
    /// Total steps of each stage; overrides `epochs` when set.
    pub steps: Option<u64>,
    /// Epochs of each stage (an epoch is floor(training subjects / batch) steps).
    pub epochs: u64,
    /// Global batch in subjects; even, because triplet negatives pair subjects (2k, 2k+1).
    pub batch: usize,
    pub lr_triplet: f64,
    pub lr_mevp: f64,
    pub weight_decay: f64,
    /// Learning-rate factor applied after every epoch.
    pub lr_decay: f64,
    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    pub clip: f64,
    pub seed: u64,
    /// Epochs without a better validation loss before stopping; 0 never stops early.
    pub patience: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Step checkpoints kept (best.h5 and final.h5 are kept besides).
    pub keep_last: usize,
    /// Steps between log lines.
    pub log_every: u64,
    pub val_every_epoch: bool,
    /// Dropout in the MEVP transformer (after the attention projection and after the
    /// feed-forward block), training steps only; 0 is the default and the paper's model
    /// without it.
    pub dropout: f32,
    pub pos_base: f64,
    /// One sequence of the three planes' tokens per subject instead of one per plane.
    pub joint_sequence: bool,
    /// MEVP trains the encoder too (targets detached; `cache_targets` does not apply).
    pub trainable_encoder_in_mevp: bool,
    /// Triplet margin.
    pub margin: f64,
    /// Fraction of each plane's slice positions masked by MEVP (floored per plane).
    pub mask_fraction: f64,
    /// Keep each subject's encoder vectors in RUN_DIR/mevp-cache during MEVP, keyed by the
    /// corpus and encoder checksums: the encoder is frozen, so they never change, and later
    /// epochs, validation and resumed runs skip the encoder (bit-identical results). Not used
    /// with `trainable_encoder_in_mevp`.
    pub cache_targets: bool,
    /// Size of the gradient buckets summed over ranks while backward runs, in KiB.
    pub allreduce_bucket_kb: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        let model = ModelConfig::preset(Preset::Paper);
        Self {
            preset: Preset::Paper,
            stage: Stages::All,
            steps: None,
            epochs: 300,
            batch: 4,
            lr_triplet: 1e-4,
            lr_mevp: 5e-4,
            weight_decay: 0.0,
            lr_decay: 0.99,
            clip: 1.0,
            seed: 0,
            patience: 10,
            checkpoint_every: 100,
            keep_last: 3,
            log_every: 1,
            val_every_epoch: true,
            dropout: model.dropout,
            pos_base: model.pos_base,
            joint_sequence: model.joint_sequence,
            trainable_encoder_in_mevp: model.trainable_encoder_in_mevp,
            margin: 1.0,
            mask_fraction: 0.1,
            cache_targets: true,
            allreduce_bucket_kb: 1024,
        }
    }
}

impl RunConfig {
    /// Reads a TOML file. Keys left out take their defaults; an unknown key or a value of the
    /// wrong type is an error naming the file, the key and the line. Not validated: apply the
    /// command-line overrides, then call [`RunConfig::validate`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the run configuration", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("{}: bad run configuration", path.display()))
    }

    /// Parses TOML text (see [`RunConfig::load`]).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("cannot write the run configuration as TOML")
    }

    /// Writes the configuration as TOML, atomically (the copy kept in the run folder).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, self.to_toml()?.as_bytes(), true)
    }

    /// The model this run trains: the preset's shapes with the run's model options.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            dropout: self.dropout,
            pos_base: self.pos_base,
            joint_sequence: self.joint_sequence,
            trainable_encoder_in_mevp: self.trainable_encoder_in_mevp,
            ..ModelConfig::preset(self.preset)
        }
    }

    /// The learning rate a stage starts from.
    pub fn lr(&self, stage: Stage) -> f64 {
        match stage {
            Stage::Triplet => self.lr_triplet,
            Stage::Mevp => self.lr_mevp,
        }
    }

    /// Refuses values no run can use, one clear message per problem.
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            bail!("batch must be positive (it counts subjects), got 0");
        }
        if self.batch % 2 != 0 {
            bail!(
                "batch {} is odd: triplet negatives pair subjects (2k, 2k+1), so the batch must \
be even",
                self.batch
            );
        }
        for (name, lr) in [("lr_triplet", self.lr_triplet), ("lr_mevp", self.lr_mevp)] {
            if !(lr.is_finite() && lr > 0.0) {
                bail!("{name} {lr} must be a positive learning rate");
            }
        }
        if self.steps == Some(0) {
            bail!("steps must be positive when given");
        }
        if self.steps.is_none() && self.epochs == 0 {
            bail!("epochs must be positive (or give steps)");
        }
        let nonneg = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} {v} must be a finite number >= 0");
            }
            Ok(())
        };
        nonneg("weight_decay", self.weight_decay)?;
        nonneg("clip", self.clip)?;
        if !(self.lr_decay > 0.0 && self.lr_decay <= 1.0) {
            bail!("lr_decay {} must be in (0, 1]", self.lr_decay);
        }
        if !(self.margin.is_finite() && self.margin > 0.0) {
            bail!("margin {} must be positive", self.margin);
        }
        for (name, v) in [
            ("checkpoint_every", self.checkpoint_every),
            ("log_every", self.log_every),
            ("keep_last", self.keep_last as u64),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.allreduce_bucket_kb == 0 {
            bail!("allreduce_bucket_kb must be at least 1");
        }
        if !(self.mask_fraction > 0.0 && self.mask_fraction < 1.0) {
            bail!("mask_fraction {} must be in (0, 1)", self.mask_fraction);
        }
        let model = self.model_config();
        let masked = model.masked_per_plane(self.mask_fraction);
        if masked.contains(&0) {
            bail!(
                "mask_fraction {} masks no slice of some plane at preset {} ({masked:?} per \
plane); raise it",
                self.mask_fraction,
                self.preset
            );
        }
        model.validate()
    }

    /// The start-of-run table: one `key  value` line per setting, in field order, derived from
    /// the TOML so that it lists exactly what is saved.
    pub fn table(&self) -> Result<String> {
        let text = self.to_toml()?;
        let mut rows: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        if self.steps.is_none() {
            // TOML has no null: say what an absent `steps` means.
            let at = rows.iter().position(|r| r.0 == "epochs").unwrap_or(0);
            rows.insert(at, ("steps".into(), "- (epochs decide)".into()));
        }
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut out = String::from("run configuration:\n");
        for (k, v) in rows {
            out.push_str(&format!("  {k:width$}  {v}\n"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_paper_md() {
        let c = RunConfig::default();
        assert_eq!(c, RunConfig::from_toml("").unwrap());
        assert_eq!((c.batch, c.lr_triplet, c.lr_mevp), (4, 1e-4, 5e-4));
        assert_eq!((c.lr_decay, c.clip, c.weight_decay), (0.99, 1.0, 0.0));
        assert_eq!(c.mask_fraction, 0.1);
        c.validate().unwrap();
        assert_eq!(c.model_config(), ModelConfig::preset(Preset::Paper));
    }

    #[test]
    fn round_trips_through_toml() {
        let c = RunConfig {
            preset: Preset::Tiny,
            stage: Stages::Mevp,
            steps: Some(20),
            joint_sequence: true,
            ..RunConfig::default()
        };
        let text = c.to_toml().unwrap();
        assert!(text.contains("preset = \"tiny\"") && text.contains("stage = \"mevp\""));
        assert_eq!(RunConfig::from_toml(&text).unwrap(), c);
        assert!(c.model_config().joint_sequence);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let e = RunConfig::from_toml("batch = 8\nlearning_rate = 0.1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = RunConfig::from_toml("batch = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch"), "{e}");
        let e = RunConfig::from_toml("preset = \"huge\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("huge"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_one_by_one() {
        let bad = [
            ("batch = 0", "batch must be positive"),
            ("batch = 3", "odd"),
            ("lr_triplet = 0.0", "lr_triplet"),
            ("lr_mevp = -1e-3", "lr_mevp"),
            ("steps = 0", "steps"),
            ("lr_decay = 1.5", "lr_decay"),
            ("clip = -1.0", "clip"),
            ("margin = 0.0", "margin"),
            ("keep_last = 0", "keep_last"),
            ("mask_fraction = 1.0", "mask_fraction"),
            ("preset = \"tiny\"\nmask_fraction = 0.01", "masks no slice"),
            ("dropout = 1.0", "dropout"),
            ("pos_base = 0.5", "pos_base"),
        ];
        for (text, want) in bad {
            let c = RunConfig::from_toml(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn table_lists_every_key() {
        let c = RunConfig::default();
        let t = c.table().unwrap();
        let keys = [
            "preset",
            "stage",
            "steps",
            "epochs",
            "batch",
            "lr_triplet",
            "lr_mevp",
            "weight_decay",
            "lr_decay",
            "clip",
            "seed",
            "patience",
            "checkpoint_every",
            "keep_last",
            "log_every",
            "val_every_epoch",
            "dropout",
            "pos_base",
            "joint_sequence",
            "trainable_encoder_in_mevp",
            "margin",
            "mask_fraction",
            "cache_targets",
            "allreduce_bucket_kb",
        ];
        assert_eq!(t.lines().count(), keys.len() + 1, "{t}");
        for k in keys {
            assert!(t.contains(&format!("  {k} ")), "{k} missing:\n{t}");
        }
        assert!(t.contains("epochs decide"), "{t}");
    }

    #[test]
    fn the_example_in_jobs_is_valid_and_complete() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/jobs/pretrain.toml");
        let c = RunConfig::load(std::path::Path::new(path)).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c,
            RunConfig::default(),
            "jobs/pretrain.toml drifted from the defaults"
        );
        let text = std::fs::read_to_string(path).unwrap();
        for line in RunConfig::default().to_toml().unwrap().lines() {
            let key = line.split(" =").next().unwrap();
            assert!(
                text.contains(&format!("{key} = ")),
                "jobs/pretrain.toml lacks {key}"
            );
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, "batch = 2\nfoo = 1\n").unwrap();
        let e = format!("{:#}", RunConfig::load(&p).unwrap_err());
        assert!(e.contains("run.toml") && e.contains("foo"), "{e}");
        let missing = dir.path().join("none.toml");
        let e = format!("{:#}", RunConfig::load(&missing).unwrap_err());
        assert!(e.contains("none.toml"), "{e}");
        let c = RunConfig {
            batch: 2,
            ..RunConfig::default()
        };
        c.save(&p).unwrap();
        assert_eq!(RunConfig::load(&p).unwrap(), c);
    }
}
