//! Preprocessing one subject onto the model's grid: reorient to RAS through the full affine,
//! resample to the target spacing (anti-aliased), place the foreground in the grid, normalise
//! intensities. Label maps follow the same geometry with a rule that keeps small labels.
use crate::data::geometry::Mat4;
use anyhow::Result;
use clap::ValueEnum;
use std::path::Path;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Align {
    /// Centre the head/brain foreground in the grid (any input).
    Centre,
    /// Keep world coordinates on a fixed MNI box (inputs already registered to MNI space).
    World,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Normalise {
    /// Clip to the 0.5-99.5 percentiles inside the foreground, scale to [0, 1].
    Minmax,
    /// Clip as above, then zero mean and unit variance inside the foreground.
    Zscore,
}

/// How every subject of a corpus is packed (stored in the corpus's root attributes).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PackParams {
    /// Target voxel size, mm (isotropic).
    pub spacing: f64,
    /// Target grid [X, Y, Z] in voxels.
    pub grid: [usize; 3],
    pub align: Align,
    pub normalise: Normalise,
    /// For 4-D inputs, the volume to take; None makes a 4-D input an error.
    pub volume: Option<usize>,
}

/// Which header field gave the source affine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AffineSource {
    Sform,
    Qform,
    /// Both codes 0: voxel sizes alone (a warning is raised).
    VoxelSizes,
}

/// Where a packed subject came from and how it got onto the grid, so that a prediction on
/// the grid can be written back onto the source grid.
#[derive(Clone, Debug, PartialEq)]
pub struct PackGeometry {
    /// Source image shape (first three dimensions).
    pub source_shape: [usize; 3],
    /// Source voxel index -> world mm (RAS+), the affine that was used.
    pub source_affine: Mat4,
    pub affine_source: AffineSource,
    /// Grid voxel index -> world mm (RAS+, axis-aligned, `spacing` per voxel).
    pub grid_affine: Mat4,
    /// Grid voxel index -> source voxel index: the packing transform (reorientation,
    /// resampling and crop/pad offset in one matrix, since resampling is a single pass).
    pub grid_to_source: Mat4,
}

/// One subject on the grid.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Intensities, [X][Y][Z] in C order (z fastest), the corpus layout.
    pub volume: Vec<f32>,
    /// Segmentation labels in the same layout, when the subject has one.
    pub labels: Option<Vec<u8>>,
    pub geometry: PackGeometry,
    /// Things the user should know (affine fallback, cropped foreground...).
    pub warnings: Vec<String>,
}

/// Reads, validates and preprocesses one subject (and its segmentation, which must share the
/// image's grid and affine).
pub fn prepare_subject(
    image: &Path,
    segmentation: Option<&Path>,
    params: &PackParams,
) -> Result<Prepared> {
    let _ = (image, segmentation, params);
    anyhow::bail!("prepare_subject: being written")
}
