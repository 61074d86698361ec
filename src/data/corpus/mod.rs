//! The HDF5 corpus (format "mtx-hpc-corpus", version 1): packed subjects on one grid plus the
//! metadata and geometry needed to map predictions back onto the sources. `write` streams a
//! corpus out, `read` opens and validates one, `split` decides train/validation.
//! docs/CORPUS.md is the user-facing description of the layout; keep the two in step.
mod read;
mod split;
mod write;

pub use read::{Corpus, CorpusInfo, is_hdf5};
pub use split::{split_subjects, val_count};
pub use write::CorpusWriter;

use crate::data::geometry::Mat4;
use crate::data::preprocess::{AffineSource, PackGeometry, PackParams};

/// Value of the root attribute `format`.
pub const FORMAT_NAME: &str = "mtx-hpc-corpus";
/// Value of the root attribute `format_version`; readers refuse any other.
pub const FORMAT_VERSION: u32 = 1;
/// Text of the `codes` attribute on `/subjects/split`.
pub const SPLIT_CODES: &str = "0=train,1=val";

/// Train or validation; stored as uint8 0/1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn code(self) -> u8 {
        match self {
            Split::Train => 0,
            Split::Val => 1,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Split::Train),
            1 => Some(Split::Val),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// What the manifest says about one subject (empty strings and None mean unknown).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SubjectMeta {
    pub id: String,
    pub session: String,
    /// The image path as the manifest lists it (relative to its folder), or the file name
    /// within `pack --dir`.
    pub source_file: String,
    /// BLAKE3 of the image file, hex.
    pub source_checksum: String,
    pub age: Option<f32>,
    pub sex: String,
    pub diagnosis: String,
    pub site: String,
}

/// One subject as stored in a corpus.
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectInfo {
    pub meta: SubjectMeta,
    pub has_segmentation: bool,
    pub split: Split,
    pub geometry: PackGeometry,
}

/// Everything about a corpus that is fixed before the first subject is written.
#[derive(Clone, Debug, PartialEq)]
pub struct CorpusHeader {
    pub params: PackParams,
    /// The command line that made the corpus (argv joined).
    pub creation_command: String,
    pub val_fraction: f64,
    pub split_seed: u64,
}

/// The strings stored in `/subjects/affine_source`.
pub fn affine_source_name(source: AffineSource) -> &'static str {
    match source {
        AffineSource::Sform => "sform",
        AffineSource::Qform => "qform",
        AffineSource::VoxelSizes => "voxel_sizes",
    }
}

pub fn parse_affine_source(name: &str) -> Option<AffineSource> {
    match name {
        "sform" => Some(AffineSource::Sform),
        "qform" => Some(AffineSource::Qform),
        "voxel_sizes" => Some(AffineSource::VoxelSizes),
        _ => None,
    }
}

fn mat_to_flat(m: &Mat4) -> [f64; 16] {
    let mut out = [0.0; 16];
    for (r, row) in m.iter().enumerate() {
        out[r * 4..r * 4 + 4].copy_from_slice(row);
    }
    out
}

fn mat_from_flat(v: &[f64]) -> Mat4 {
    let mut m = [[0.0; 4]; 4];
    for (r, row) in m.iter_mut().enumerate() {
        row.copy_from_slice(&v[r * 4..r * 4 + 4]);
    }
    m
}
