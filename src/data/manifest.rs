//! The subject manifest (CSV): what `synth` writes and `pack` reads. Columns `subject_id,image`
//! are required; `session,age,sex,diagnosis,site,segmentation` optional; paths are relative to
//! the CSV's folder. Reading validates everything that can be checked without opening images;
//! `scan_dir` builds the same list from a folder of NIfTI files.
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

pub const REQUIRED_COLUMNS: [&str; 2] = ["subject_id", "image"];
pub const OPTIONAL_COLUMNS: [&str; 6] =
    ["session", "age", "sex", "diagnosis", "site", "segmentation"];
pub const DIAGNOSES: [&str; 3] = ["CN", "MCI", "AD"];
pub const SEXES: [&str; 2] = ["M", "F"];

/// A validated subject to pack: paths resolved, values normalised (upper-case sex and
/// diagnosis), where it came from for messages.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectInput {
    pub id: String,
    pub session: Option<String>,
    /// The image path as listed (relative to the manifest's folder), kept for provenance.
    pub image_entry: String,
    /// The image path to open.
    pub image: PathBuf,
    pub segmentation: Option<PathBuf>,
    pub age: Option<f64>,
    pub sex: Option<String>,
    pub diagnosis: Option<String>,
    pub site: Option<String>,
    /// "manifest.csv line 4" or the file name within a folder.
    pub origin: String,
}

impl SubjectInput {
    /// "ID" or "ID (session S)", for messages.
    pub fn label(&self) -> String {
        match &self.session {
            Some(s) => format!("{} (session {s})", self.id),
            None => self.id.clone(),
        }
    }
}

/// Reads and validates a manifest: header, values, duplicates. Missing image files are not
/// checked here (see [`missing_files`]): with `--skip-bad` they skip one subject only.
pub fn read_manifest(path: &Path) -> Result<Vec<SubjectInput>> {
    let p = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("{p}: cannot read the manifest"))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        bail!("{p}: manifest is empty (expected a header line with at least subject_id,image)");
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes.as_slice());
    let header = reader
        .headers()
        .with_context(|| format!("{p}: cannot read the header line"))?
        .clone();
    let columns = column_index(&header).with_context(|| format!("{p}: bad header"))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    let mut seen: HashMap<(String, Option<String>), u64> = HashMap::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("{p}: malformed CSV"))?;
        let line = record.position().map_or(0, |pos| pos.line());
        let at = format!("{p} line {line}");
        let field = |name: &str| -> Option<String> {
            columns
                .get(name)
                .and_then(|&i| record.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let id = field("subject_id").ok_or_else(|| anyhow!("{at}: subject_id is empty"))?;
        let image_entry =
            field("image").ok_or_else(|| anyhow!("{at}: image is empty for subject {id}"))?;
        let session = field("session");
        let key = (id.clone(), session.clone());
        if let Some(first) = seen.insert(key, line) {
            let which = session
                .as_deref()
                .map_or(String::new(), |s| format!(", session {s}"));
            bail!("{at}: duplicate subject {id}{which} (first on line {first})");
        }
        let age = match field("age") {
            None => None,
            Some(a) => Some(
                a.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| {
                        anyhow!("{at}: age '{a}' of subject {id} is not a non-negative number")
                    })?,
            ),
        };
        let sex = field("sex")
            .map(|s| {
                let up = s.to_ascii_uppercase();
                if SEXES.contains(&up.as_str()) {
                    Ok(up)
                } else {
                    Err(anyhow!(
                        "{at}: sex '{s}' of subject {id} is not one of M, F (or empty)"
                    ))
                }
            })
            .transpose()?;
        let diagnosis = field("diagnosis")
            .map(|d| {
                let up = d.to_ascii_uppercase();
                if DIAGNOSES.contains(&up.as_str()) {
                    Ok(up)
                } else {
                    Err(anyhow!(
                        "{at}: diagnosis '{d}' of subject {id} is not one of CN, MCI, AD (or empty)"
                    ))
                }
            })
            .transpose()?;
        out.push(SubjectInput {
            image: folder.join(&image_entry),
            segmentation: field("segmentation").map(|s| folder.join(s)),
            image_entry,
            id,
            session,
            age,
            sex,
            diagnosis,
            site: field("site"),
            origin: at,
        });
    }
    if out.is_empty() {
        bail!("{p}: manifest lists no subjects (only a header)");
    }
    Ok(out)
}

fn column_index(header: &csv::StringRecord) -> Result<HashMap<String, usize>> {
    let mut columns = HashMap::new();
    let mut unknown = Vec::new();
    for (i, name) in header.iter().enumerate() {
        // A UTF-8 byte-order mark from spreadsheet exports is not part of the name.
        let name = name.trim_start_matches('\u{feff}');
        if !REQUIRED_COLUMNS.contains(&name) && !OPTIONAL_COLUMNS.contains(&name) {
            unknown.push(format!("'{name}'"));
        } else if columns.insert(name.to_string(), i).is_some() {
            bail!("column '{name}' appears twice");
        }
    }
    if !unknown.is_empty() {
        bail!(
            "unknown column(s) {} (known: {}, {})",
            unknown.join(", "),
            REQUIRED_COLUMNS.join(", "),
            OPTIONAL_COLUMNS.join(", ")
        );
    }
    let missing: Vec<&str> = REQUIRED_COLUMNS
        .iter()
        .copied()
        .filter(|c| !columns.contains_key(*c))
        .collect();
    if !missing.is_empty() {
        bail!(
            "required column(s) {} missing (the header must name at least subject_id,image)",
            missing.join(", ")
        );
    }
    Ok(columns)
}

/// Subjects from a folder: every `.nii`/`.nii.gz` file is one subject (id = name without
/// extension), except `ID_seg.nii[.gz]`, the segmentation of subject ID. Sorted by id.
pub fn scan_dir(dir: &Path) -> Result<Vec<SubjectInput>> {
    let d = dir.display();
    if !dir.is_dir() {
        bail!("{d}: not a folder");
    }
    let mut images: HashMap<String, String> = HashMap::new();
    let mut segs: HashMap<String, String> = HashMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("{d}: cannot list"))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{d}: cannot list"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_suffix(".nii.gz")
            .or_else(|| name.strip_suffix(".nii"))
        else {
            continue;
        };
        let (map, id) = match stem.strip_suffix("_seg") {
            Some(id) => (&mut segs, id.to_string()),
            None => (&mut images, stem.to_string()),
        };
        if let Some(other) = map.insert(id.clone(), name.clone()) {
            bail!("{d}: {other} and {name} both claim subject {id}");
        }
    }
    if images.is_empty() {
        bail!("{d}: no .nii or .nii.gz images in this folder");
    }
    if let Some((id, name)) = segs.iter().find(|(id, _)| !images.contains_key(*id)) {
        bail!("{d}: segmentation {name} has no image {id}.nii.gz or {id}.nii");
    }
    let mut out: Vec<SubjectInput> = images
        .into_iter()
        .map(|(id, name)| SubjectInput {
            image: dir.join(&name),
            segmentation: segs.get(&id).map(|s| dir.join(s)),
            origin: format!("{}", dir.join(&name).display()),
            image_entry: name,
            id,
            session: None,
            age: None,
            sex: None,
            diagnosis: None,
            site: None,
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// For each subject whose image or segmentation file is missing: (index, reason).
pub fn missing_files(subjects: &[SubjectInput]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        if !s.image.is_file() {
            out.push((
                i,
                format!("image {} not found ({})", s.image.display(), s.origin),
            ));
        } else if let Some(seg) = s.segmentation.as_ref().filter(|p| !p.is_file()) {
            out.push((
                i,
                format!("segmentation {} not found ({})", seg.display(), s.origin),
            ));
        }
    }
    out
}
