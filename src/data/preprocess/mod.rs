//! Preprocessing one subject onto the model's grid: reorient to RAS through the full affine,
//! resample to the target spacing (anti-aliased), place the foreground in the grid, normalise
//! intensities. Label maps follow the same geometry with a rule that keeps small labels.
//! Steps live in `foreground` (threshold, centre, cropping), `resample` (one pass through the
//! full affine) and `normalise`; this file places the grid and runs them in order.
pub mod foreground;
pub mod normalise;
pub mod resample;
pub mod source;

use crate::data::geometry::{self, Mat4};
use crate::data::nifti::read::{LabelImage, NiftiImage, RawImage, read_labels, read_raw};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
pub use normalise::IntensityStats;
use source::SourceVolume;
use std::path::Path;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Align {
    /// Centre the head/brain foreground in the grid (any input): the centre of mass of the
    /// voxels above 10% of the way from the 2nd to the 98th intensity percentile.
    Centre,
    /// Keep world coordinates on a fixed MNI box centred at (0, -18, 18) mm, the centre of the
    /// MNI brain bounding box (inputs already registered to MNI space).
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
    /// Foreground threshold, clip range and statistics used by normalisation.
    pub intensity: IntensityStats,
}

/// Centre of the fixed MNI box that `--align world` puts the grid on: the centre of the MNI
/// brain bounding box x -90..90, y -126..90, z -72..108 mm. The paper grid (96 x 114 x 96 at
/// 2 mm) then spans x -95..95, y -131..95, z -77..113 mm (voxel centres).
pub const MNI_BOX_CENTRE: [f64; 3] = [0.0, -18.0, 18.0];

/// Fraction of the foreground that may fall outside the grid before we warn (isolated noise
/// voxels at the edge of a field of view are not worth a warning).
const CROP_WARN_FRACTION: f64 = 0.001;

/// Grid voxel -> world: axis-aligned RAS, `spacing` mm per voxel, the grid's centre (voxel
/// (n-1)/2 on each axis) at `centre` mm.
pub fn grid_affine(centre: [f64; 3], spacing: f64, grid: [usize; 3]) -> Mat4 {
    let mut m = geometry::IDENTITY;
    for a in 0..3 {
        m[a][a] = spacing;
        m[a][3] = centre[a] - spacing * (grid[a] as f64 - 1.0) / 2.0;
    }
    m
}

/// Reads, validates and preprocesses one subject (and its segmentation, which must share the
/// image's grid and affine).
pub fn prepare_subject(
    image: &Path,
    segmentation: Option<&Path>,
    params: &PackParams,
) -> Result<Prepared> {
    check_params(params)?;
    // The voxels stay as the file's bytes: each step converts only the rows it reads.
    let raw = read_raw(image, params.volume)?;
    raw.check_finite()?;
    let seg = segmentation.map(read_labels).transpose()?;
    if let Some(seg) = &seg {
        check_same_grid(&raw.path, raw.dims, &raw.affine, seg)?;
    }
    let img = SourceImage::from_raw(&raw);
    prepare_source(&img, seg.as_ref(), params)
}

/// Preprocesses an image already read as f32 (and its label map, which must share its grid).
pub fn prepare_image(
    img: &NiftiImage,
    seg: Option<&LabelImage>,
    params: &PackParams,
) -> Result<Prepared> {
    check_params(params)?;
    if let Some(seg) = seg {
        check_same_grid(&img.path, img.dims, &img.affine, seg)?;
    }
    let src = SourceImage {
        path: &img.path,
        volume: SourceVolume::F32 {
            data: &img.data,
            dims: img.dims,
        },
        dims: img.dims,
        affine: img.affine,
        affine_source: img.affine_source,
        warnings: &img.warnings,
    };
    prepare_source(&src, seg, params)
}

/// What the steps need of a source image, whichever way it was read.
struct SourceImage<'a> {
    path: &'a Path,
    volume: SourceVolume<'a>,
    dims: [usize; 3],
    affine: Mat4,
    affine_source: AffineSource,
    warnings: &'a [String],
}

impl<'a> SourceImage<'a> {
    fn from_raw(raw: &'a RawImage) -> Self {
        Self {
            path: &raw.path,
            volume: SourceVolume::Raw(raw),
            dims: raw.dims,
            affine: raw.affine,
            affine_source: raw.affine_source,
            warnings: &raw.warnings,
        }
    }
}

fn prepare_source(
    img: &SourceImage,
    seg: Option<&LabelImage>,
    params: &PackParams,
) -> Result<Prepared> {
    let mut warnings = img.warnings.to_vec();
    let samples = foreground::Samples::take(&img.volume);
    let fg = foreground::find(&samples, &img.affine);
    if fg.sampled_count == 0 {
        warnings.push(format!(
            "{}: no foreground stands out from the background; centred on the field of view",
            img.path.display()
        ));
    }
    let centre = match params.align {
        Align::Centre => fg.centre_world,
        Align::World => MNI_BOX_CENTRE,
    };
    let grid_affine = grid_affine(centre, params.spacing, params.grid);
    let crop = foreground::cropping(
        &samples,
        &img.affine,
        fg.threshold,
        &grid_affine,
        params.grid,
    );
    if crop.fraction_outside > CROP_WARN_FRACTION {
        warnings.push(crop_warning(img.path, &crop));
    }
    let source_inverse = geometry::inverse(&img.affine)
        .with_context(|| format!("{}: singular affine", img.path.display()))?;
    let m = geometry::mul(&source_inverse, &grid_affine);
    let widths = resample::filter_widths(params.spacing, geometry::voxel_sizes(&img.affine));
    let mut volume = resample::resample_intensity(&img.volume, &m, params.grid, widths);
    let fov = field_of_view(&m, img.dims, params.grid);
    let intensity = normalise::apply(&mut volume, &fov, fg.threshold, params.normalise)
        .map_err(|e| anyhow::anyhow!("{}: {e}", img.path.display()))?;
    let labels = seg.map(|s| resample::resample_labels(&s.labels, s.dims, &m, params.grid));
    Ok(Prepared {
        volume,
        labels,
        geometry: PackGeometry {
            source_shape: img.dims,
            source_affine: img.affine,
            affine_source: img.affine_source,
            grid_affine,
            grid_to_source: m,
        },
        warnings,
        intensity,
    })
}

fn check_params(params: &PackParams) -> Result<()> {
    if !params.spacing.is_finite() || params.spacing <= 0.0 {
        bail!(
            "--spacing must be a positive number of millimetres, got {}",
            params.spacing
        );
    }
    if params.grid.contains(&0) {
        bail!(
            "--grid must have three positive sizes, got {:?}",
            params.grid
        );
    }
    Ok(())
}

/// A segmentation must sit on its image's voxels exactly: same shape, same affine (to 1e-3 mm,
/// float32 header precision).
fn check_same_grid(path: &Path, dims: [usize; 3], affine: &Mat4, seg: &LabelImage) -> Result<()> {
    if dims != seg.dims {
        bail!(
            "segmentation {} has shape {:?} but its image {} has shape {:?}: they must share one grid",
            seg.path.display(),
            seg.dims,
            path.display(),
            dims
        );
    }
    let differs = (0..3).any(|r| {
        (0..4).any(|c| (affine[r][c] - seg.affine[r][c]).abs() > 1e-3 + 1e-5 * affine[r][c].abs())
    });
    if differs {
        bail!(
            "segmentation {} has a different affine from its image {}: {:?} vs {:?}",
            seg.path.display(),
            path.display(),
            &seg.affine[..3],
            &affine[..3]
        );
    }
    Ok(())
}

fn crop_warning(path: &Path, crop: &foreground::Cropping) -> String {
    let names = [
        ["left", "right"],
        ["posterior", "anterior"],
        ["inferior", "superior"],
    ];
    let sides: Vec<String> = (0..3)
        .flat_map(|a| {
            [
                (crop.below_mm[a], names[a][0]),
                (crop.above_mm[a], names[a][1]),
            ]
            .into_iter()
            .filter(|(mm, _)| *mm > 0.0)
            .map(|(mm, side)| format!("{mm:.0} mm {side}"))
        })
        .collect();
    format!(
        "{}: foreground cropped by the grid: {:.1}% of it falls outside ({})",
        path.display(),
        crop.fraction_outside * 100.0,
        sides.join(", ")
    )
}

/// Which grid voxels map inside the source volume (within half a voxel of its edge voxels).
fn field_of_view(m: &Mat4, dims: [usize; 3], grid: [usize; 3]) -> Vec<bool> {
    let mut out = vec![false; grid[0] * grid[1] * grid[2]];
    let limit = dims.map(|d| d as f64 - 0.5);
    let inside = |p: [f64; 3]| (0..3).all(|a| p[a] >= -0.5 && p[a] <= limit[a]);
    let step = [m[0][2], m[1][2], m[2][2]];
    for (row, x_y) in out.chunks_exact_mut(grid[2]).zip(0..) {
        let (x, y) = (x_y / grid[1], x_y % grid[1]);
        let mut p = geometry::apply(m, [x as f64, y as f64, 0.0]);
        for v in row.iter_mut() {
            *v = inside(p);
            for a in 0..3 {
                p[a] += step[a];
            }
        }
    }
    out
}
