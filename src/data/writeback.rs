//! From the corpus grid back to a subject's own scan: per-class probability maps (or a hard
//! label map) on the grid resampled onto the source voxels through the packing transform, and
//! written as a uint8 NIfTI that overlays the input image. Also the other direction for a new
//! scan: preprocessing exactly as `pack` does, including the corpus's float16 rounding.
use crate::data::geometry::{self, Mat4};
use crate::data::nifti::write::{Encoding, HeaderInfo, write_nifti_with};
use crate::data::preprocess::{PackParams, Prepared, prepare_subject};
use anyhow::{Result, anyhow, ensure};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::path::Path;

/// The BraTS label codes in class order: background, necrotic core, oedema, enhancing.
pub const BRATS_CODES: [u8; 4] = [0, 1, 2, 4];

/// The most classes a class index (u8) can name.
const MAX_CLASSES: usize = 256;

/// Resamples per-class probability maps from the grid onto the source grid and decides each
/// source voxel's class from its interpolated probabilities with `decide` ([`argmax`], the
/// most probable class, or a task's own rule such as the segmentation's nested regions).
///
/// - `probs`: `[classes, X, Y, Z]` in C order (z fastest), `grid = [X, Y, Z]`, the corpus
///   layout; the values need not sum to 1 but must be finite.
/// - `grid_to_source`: grid voxel index -> source voxel index, as the corpus stores it. Each
///   source voxel `s` is mapped to the grid point `inv(grid_to_source) @ s` and every class map
///   is interpolated trilinearly there.
/// - Source voxels that land more than half a voxel outside the grid (outside
///   `-0.5 ..= n - 0.5` on some axis, the area the grid voxels cover, as `pack`'s field of view
///   rule) are class 0, background, with probability 1. Within that half voxel the map's edge
///   values are used.
/// - Ties go to the lower class.
///
/// Returns one class index per source voxel in NIfTI order (i fastest, then j, then k), which
/// is what [`write_label_nifti`] and `nifti::write` take. Source slabs (one k each) run in
/// parallel; each voxel's result depends on nothing else, so the output does not depend on the
/// thread count.
pub fn probs_to_source(
    probs: &[f32],
    classes: usize,
    grid: [usize; 3],
    grid_to_source: &Mat4,
    source_shape: [usize; 3],
    decide: impl Fn(&[f32]) -> u8 + Sync,
) -> Result<Vec<u8>> {
    ensure!(
        (1..=MAX_CLASSES).contains(&classes),
        "{classes} classes: need 1 to {MAX_CLASSES}"
    );
    ensure!(
        grid.iter().chain(&source_shape).all(|&n| n > 0),
        "empty grid {grid:?} or source shape {source_shape:?}"
    );
    let per_class: usize = grid.iter().product();
    ensure!(
        probs.len() == classes * per_class,
        "probability maps hold {} values, but {classes} classes on a {grid:?} grid need {}",
        probs.len(),
        classes * per_class
    );
    let bad = probs.iter().filter(|p| !p.is_finite()).count();
    ensure!(bad == 0, "probability maps hold {bad} non-finite values");
    let to_grid = geometry::inverse(grid_to_source)
        .ok_or_else(|| anyhow!("grid_to_source is singular or not finite: {grid_to_source:?}"))?;

    let [ni, nj, nk] = source_shape;
    let mut out = vec![0u8; ni * nj * nk];
    out.par_chunks_mut(ni * nj)
        .enumerate()
        .for_each(|(k, slab)| {
            let step = [to_grid[0][0], to_grid[1][0], to_grid[2][0]];
            let mut sums = vec![0.0f32; classes];
            for (j, row) in slab.chunks_exact_mut(ni).enumerate() {
                let start = geometry::apply(&to_grid, [0.0, j as f64, k as f64]);
                for (i, class) in row.iter_mut().enumerate() {
                    // From the row's start each time, so rounding does not build up along it.
                    let p = [0, 1, 2].map(|a| start[a] + i as f64 * step[a]);
                    let Some(corners) = Corners::at(p, grid) else {
                        continue;
                    };
                    for (c, sum) in sums.iter_mut().enumerate() {
                        *sum = corners.interpolate(&probs[c * per_class..][..per_class]);
                    }
                    *class = decide(&sums);
                }
            }
        });
    Ok(out)
}

/// Writes a hard label map on the grid back onto the source grid: one-hot maps over `codes`,
/// then [`probs_to_source`], then each class back to its code. `labels` is `[X, Y, Z]` in C
/// order (z fastest); every value must be one of `codes`. `codes[0]` must be 0: it is the
/// background written where the grid does not reach. Ties between codes (a source voxel
/// halfway between two labels) go to the code listed first, so the order of `codes` is the
/// tie-break (for BraTS, [`BRATS_CODES`]). Returns codes in NIfTI order (i fastest).
///
/// Trilinear interpolation of the one-hot maps puts each label boundary halfway between grid
/// voxel centres, where nearest-neighbour lookup would make it a staircase of grid voxels.
pub fn labels_to_source(
    labels: &[u8],
    grid: [usize; 3],
    grid_to_source: &Mat4,
    source_shape: [usize; 3],
    codes: &[u8],
) -> Result<Vec<u8>> {
    ensure!(
        codes.first() == Some(&0),
        "label codes {codes:?} must start with 0, the background"
    );
    let mut class_of = [None; MAX_CLASSES];
    for (class, &code) in codes.iter().enumerate() {
        ensure!(
            class_of[usize::from(code)].is_none(),
            "label code {code} is listed twice in {codes:?}"
        );
        class_of[usize::from(code)] = Some(class);
    }
    let n: usize = grid.iter().product();
    ensure!(
        labels.len() == n,
        "label map holds {} values, but a {grid:?} grid needs {n}",
        labels.len()
    );
    let mut one_hot = vec![0.0f32; codes.len() * n];
    for (idx, &l) in labels.iter().enumerate() {
        let class = class_of[usize::from(l)]
            .ok_or_else(|| anyhow!("grid label {l} is not among the codes {codes:?}"))?;
        one_hot[class * n + idx] = 1.0;
    }
    let classes = probs_to_source(
        &one_hot,
        codes.len(),
        grid,
        grid_to_source,
        source_shape,
        argmax,
    )?;
    Ok(classes.into_iter().map(|c| codes[usize::from(c)]).collect())
}

/// Writes a label map on the source grid (NIfTI order, i fastest, as the two functions above
/// return it) as a uint8 NIfTI-1 image, gzip-compressed when `path` ends in `.gz`, with sform
/// and qform both set from `source_affine` (the subject's `source_affine` in the corpus), so
/// nibabel and viewers place it over the input scan. The file appears complete or not at all
/// (`io::AtomicFile`) and an existing file is replaced. Errors name the file.
pub fn write_label_nifti(
    path: &Path,
    labels: &[u8],
    source_shape: [usize; 3],
    source_affine: &Mat4,
) -> Result<()> {
    let n: usize = source_shape.iter().product();
    ensure!(
        labels.len() == n,
        "{}: label map holds {} values, but source shape {source_shape:?} needs {n}",
        path.display(),
        labels.len()
    );
    let values: Vec<f32> = labels.iter().map(|&l| f32::from(l)).collect();
    let info = HeaderInfo {
        description: format!("mtx-hpc {} prediction", crate::TOOL_VERSION),
        ..HeaderInfo::default()
    };
    write_nifti_with(
        path,
        source_shape,
        &values,
        source_affine,
        Encoding::UInt8,
        &info,
    )
}

/// Reads and preprocesses one new image exactly as `pack` does (`params` should be the
/// corpus's, `Corpus::info().params`), then rounds the volume through float16 as the corpus
/// stores it, so `volume` is bit for bit what `Corpus::read_volume` would return for this file
/// packed with the same parameters. `geometry` is what the corpus would record for it: the
/// input to [`labels_to_source`] and [`write_label_nifti`]. `labels` is None.
pub fn prepare_for_prediction(image: &Path, params: &PackParams) -> Result<Prepared> {
    let mut prepared = prepare_subject(image, None, params)?;
    round_through_f16(&mut prepared.volume);
    Ok(prepared)
}

/// The corpus writer's f32 -> f16 conversion followed by the reader's f16 -> f32, the same two
/// slice conversions (round to nearest even).
fn round_through_f16(volume: &mut [f32]) {
    let mut half = vec![f16::ZERO; volume.len()];
    half.convert_from_f32_slice(volume);
    half.convert_to_f32_slice(volume);
}

/// The eight grid voxels around a point (C order indices on the grid, z fastest) and their
/// trilinear weights.
struct Corners {
    index: [usize; 8],
    weight: [f32; 8],
}

impl Corners {
    /// None when `p` is more than half a voxel outside the grid on some axis. Within that half
    /// voxel the coordinate is clamped onto the edge voxels.
    fn at(p: [f64; 3], grid: [usize; 3]) -> Option<Self> {
        let mut lo = [0usize; 3];
        let mut hi = [0usize; 3];
        let mut frac = [0.0f64; 3];
        for a in 0..3 {
            let last = grid[a] as f64 - 1.0;
            if !(p[a] >= -0.5 && p[a] <= last + 0.5) {
                return None;
            }
            let q = p[a].clamp(0.0, last);
            lo[a] = (q.floor() as usize).min(grid[a] - 1);
            hi[a] = (lo[a] + 1).min(grid[a] - 1);
            frac[a] = q - lo[a] as f64;
        }
        let mut index = [0usize; 8];
        let mut weight = [0.0f32; 8];
        for n in 0..8 {
            let pick = [n >> 2 & 1, n >> 1 & 1, n & 1];
            let mut v = [0usize; 3];
            let mut w = 1.0f64;
            for a in 0..3 {
                if pick[a] == 1 {
                    v[a] = hi[a];
                    w *= frac[a];
                } else {
                    v[a] = lo[a];
                    w *= 1.0 - frac[a];
                }
            }
            index[n] = (v[0] * grid[1] + v[1]) * grid[2] + v[2];
            weight[n] = w as f32;
        }
        Some(Self { index, weight })
    }

    /// The weighted sum of `map` over the corners, always in the same order.
    fn interpolate(&self, map: &[f32]) -> f32 {
        self.index
            .iter()
            .zip(&self.weight)
            .map(|(&i, &w)| w * map[i])
            .sum()
    }
}

/// Index of the largest value; the first of equal values.
pub fn argmax(values: &[f32]) -> u8 {
    let mut best = 0;
    for (c, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = c;
        }
    }
    best as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::geometry::IDENTITY;

    /// C order index on a grid (z fastest).
    fn grid_index(grid: [usize; 3], x: usize, y: usize, z: usize) -> usize {
        (x * grid[1] + y) * grid[2] + z
    }

    /// NIfTI order index on a source grid (i fastest).
    fn source_index(shape: [usize; 3], i: usize, j: usize, k: usize) -> usize {
        (k * shape[1] + j) * shape[0] + i
    }

    /// A deterministic scatter of BraTS codes.
    fn scattered_labels(grid: [usize; 3]) -> Vec<u8> {
        let n = grid.iter().product::<usize>();
        (0..n).map(|v| BRATS_CODES[(v * 7 + v / 5) % 4]).collect()
    }

    fn each_voxel(shape: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
        let [a, b, c] = shape;
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| [i, j, k])))
    }

    #[test]
    fn identity_geometry_returns_the_labels_unchanged() {
        let grid = [5, 4, 3];
        let labels = scattered_labels(grid);
        let back = labels_to_source(&labels, grid, &IDENTITY, grid, &BRATS_CODES).expect("back");
        for [x, y, z] in each_voxel(grid) {
            assert_eq!(
                back[source_index(grid, x, y, z)],
                labels[grid_index(grid, x, y, z)],
                "voxel {x},{y},{z}"
            );
        }
    }

    #[test]
    fn flipped_and_permuted_axes_are_followed() {
        // Grid (x, y, z) -> source (i, j, k) = (z, 4 - y, x): an axis swap and a flip.
        let grid = [4, 5, 3];
        let source = [3, 5, 4];
        let m = [
            [0.0, 0.0, 1.0, 0.0],
            [0.0, -1.0, 0.0, 4.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let labels = scattered_labels(grid);
        let back = labels_to_source(&labels, grid, &m, source, &BRATS_CODES).expect("back");
        for [i, j, k] in each_voxel(source) {
            assert_eq!(
                back[source_index(source, i, j, k)],
                labels[grid_index(grid, k, 4 - j, i)],
                "source voxel {i},{j},{k}"
            );
        }
    }

    #[test]
    fn a_grid_twice_as_coarse_puts_boundaries_between_its_voxels() {
        // Grid voxel g covers source voxels 2g and 2g + 1: its centre is at 2g + 0.5.
        let grid = [4, 4, 4];
        let source = [8, 8, 8];
        let mut m = IDENTITY;
        for a in 0..3 {
            m[a][a] = 2.0;
            m[a][3] = 0.5;
        }
        // Labels change along one axis at a time, so that each source voxel must take the
        // label of the grid voxel that covers it.
        for axis in 0..3 {
            let mut labels = vec![0u8; 64];
            for v in each_voxel(grid) {
                labels[grid_index(grid, v[0], v[1], v[2])] = BRATS_CODES[v[axis]];
            }
            let back = labels_to_source(&labels, grid, &m, source, &BRATS_CODES).expect("back");
            for s in each_voxel(source) {
                assert_eq!(
                    back[source_index(source, s[0], s[1], s[2])],
                    BRATS_CODES[s[axis] / 2],
                    "axis {axis}, source voxel {s:?}"
                );
            }
        }
    }

    #[test]
    fn source_voxels_beyond_the_grid_are_background() {
        // A 4^3 grid of label 2 over source voxels 2..=5 of an 8^3 source.
        let grid = [4, 4, 4];
        let source = [8, 8, 8];
        let mut m = IDENTITY;
        for a in 0..3 {
            m[a][3] = 2.0;
        }
        let labels = vec![2u8; 64];
        let back = labels_to_source(&labels, grid, &m, source, &BRATS_CODES).expect("back");
        for s in each_voxel(source) {
            let inside = s.iter().all(|v| (2..=5).contains(v));
            assert_eq!(
                back[source_index(source, s[0], s[1], s[2])],
                if inside { 2 } else { 0 },
                "source voxel {s:?}"
            );
        }
    }

    #[test]
    fn ties_go_to_the_lower_class() {
        let grid = [1, 1, 2];
        // Voxel 0: three equal classes -> 0. Voxel 1: classes 1 and 2 equal, above 0 -> 1.
        let probs = [
            1.0 / 3.0,
            0.0, // class 0
            1.0 / 3.0,
            0.5, // class 1
            1.0 / 3.0,
            0.5, // class 2
        ];
        let back = probs_to_source(&probs, 3, grid, &IDENTITY, grid, argmax).expect("back");
        assert_eq!(back, vec![0, 1]);
        // Halfway between a label-4 voxel and a label-1 voxel: the code listed first wins.
        let mut m = IDENTITY;
        m[2][2] = 2.0;
        let back = labels_to_source(&[4, 1], grid, &m, [1, 1, 3], &BRATS_CODES).expect("back");
        assert_eq!(back, vec![4, 1, 1]);
    }

    #[test]
    fn probabilities_are_interpolated_linearly() {
        // A ramp of class 1 along z, sampled at half steps: class 1 wins where the
        // interpolated ramp is above 0.5.
        let grid = [1, 1, 4];
        let ramp = [0.0f32, 0.2, 0.6, 1.0];
        let mut probs: Vec<f32> = ramp.iter().map(|p| 1.0 - p).collect();
        probs.extend(&ramp);
        let mut m = IDENTITY;
        m[2][2] = 2.0;
        // Source k is at grid z = k / 2, where the ramp is 0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.
        let back = probs_to_source(&probs, 2, grid, &m, [1, 1, 7], argmax).expect("back");
        assert_eq!(back, vec![0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let grid = [2, 2, 2];
        let probs = vec![0.5f32; 16];
        assert!(probs_to_source(&probs, 3, grid, &IDENTITY, grid, argmax).is_err());
        let mut nan = probs.clone();
        nan[3] = f32::NAN;
        assert!(probs_to_source(&nan, 2, grid, &IDENTITY, grid, argmax).is_err());
        let mut singular = IDENTITY;
        singular[1][1] = 0.0;
        assert!(probs_to_source(&probs, 2, grid, &singular, grid, argmax).is_err());
        let labels = [0u8, 1, 2, 4, 3, 0, 0, 0];
        let err = labels_to_source(&labels, grid, &IDENTITY, grid, &BRATS_CODES).unwrap_err();
        assert!(err.to_string().contains("grid label 3"), "{err}");
        assert!(labels_to_source(&[0; 8], grid, &IDENTITY, grid, &[1, 0]).is_err());
        assert!(labels_to_source(&[0; 8], grid, &IDENTITY, grid, &[0, 1, 1]).is_err());
    }

    #[test]
    fn label_nifti_keeps_shape_affine_and_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pred.nii.gz");
        let shape = [3, 4, 2];
        let labels: Vec<u8> = (0..24).map(|v| BRATS_CODES[v % 4]).collect();
        let affine = [
            [0.0, -1.2, 0.0, 90.0],
            [0.0, 0.0, 1.5, -126.0],
            [-0.9, 0.0, 0.0, 72.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        write_label_nifti(&path, &labels, shape, &affine).expect("write");
        let back = crate::data::nifti::read::read_labels(&path).expect("read");
        assert_eq!(back.dims, shape);
        assert_eq!(back.labels, labels);
        for r in 0..3 {
            for c in 0..4 {
                assert!((back.affine[r][c] - affine[r][c]).abs() < 1e-5, "{r},{c}");
            }
        }
        let missing = dir.path().join("no-such-folder").join("pred.nii.gz");
        let err = write_label_nifti(&missing, &labels, shape, &affine).unwrap_err();
        assert!(format!("{err:#}").contains("no-such-folder"), "{err:#}");
        let err = write_label_nifti(&path, &labels[1..], shape, &affine).unwrap_err();
        assert!(format!("{err:#}").contains("pred.nii.gz"), "{err:#}");
    }
}
