//! The subject manifest (CSV): what `synth` writes and `pack` reads. Columns `subject_id,image`
//! are required; `session,age,sex,diagnosis,site,segmentation` optional; paths are relative to
//! the CSV's folder.
use serde::{Deserialize, Serialize};

/// One row of a manifest, as written to and read from the CSV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestRow {
    pub subject_id: String,
    #[serde(default)]
    pub session: Option<String>,
    pub image: String,
    #[serde(default)]
    pub age: Option<f64>,
    #[serde(default)]
    pub sex: Option<String>,
    #[serde(default)]
    pub diagnosis: Option<String>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub segmentation: Option<String>,
}
