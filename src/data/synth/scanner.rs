//! What the scanner and the site add: a random but valid source grid (voxel sizes, axis
//! permutation and flips, an occasional oblique tilt, a field of view around the head), the
//! head's pose in scanner space, the on-disk encoding, and per-site contrast and noise.
use super::anatomy::Contrast;
use super::random::{uniform, unit_vector};
use crate::data::geometry::{IDENTITY, Mat4, mul};
use crate::data::nifti::write::Encoding;
use rand::{Rng, RngExt};

/// A source image grid: shape and voxel -> world (scanner mm, RAS) affine.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceGrid {
    pub dims: [usize; 3],
    pub affine: Mat4,
}

/// Field of view along world x, y, z that covers the head with a margin, mm.
const FOV_MM: [f64; 3] = [190.0, 228.0, 190.0];

/// A grid around `centre` (world mm): voxel sizes 0.9-1.5 mm (one axis often coarser, like
/// a thick-slice acquisition), any of the 48 axis orders and flips, and in a quarter of the
/// subjects an oblique tilt of 2-8 degrees.
pub fn random_grid(centre: [f64; 3], rng: &mut impl Rng) -> SourceGrid {
    let base = uniform(rng, 0.9, 1.25);
    let mut vox = [base; 3];
    if rng.random_bool(0.5) {
        let slice_axis = rng.random_range(0..3);
        vox[slice_axis] = uniform(rng, base, 1.5);
    }
    for v in &mut vox {
        *v = (*v * uniform(rng, 0.97, 1.03)).clamp(0.9, 1.5);
    }
    let mut perm = [0usize, 1, 2];
    for i in (1..3).rev() {
        let j = rng.random_range(0..=i);
        perm.swap(i, j);
    }
    let mut m = [[0.0; 4]; 4];
    m[3][3] = 1.0;
    for (k, &w) in perm.iter().enumerate() {
        let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
        m[w][k] = sign * vox[k];
    }
    let mut margin = 1.0;
    if rng.random_bool(0.25) {
        let angle = uniform(rng, 2.0, 8.0).to_radians();
        m = mul(&rotation(unit_vector(rng), angle), &m);
        margin = 1.08;
    }
    let dims = [0, 1, 2].map(|k| (FOV_MM[perm[k]] * margin / vox[k]).ceil() as usize);
    let half = dims.map(|n| (n as f64 - 1.0) / 2.0);
    for r in 0..3 {
        m[r][3] = centre[r] - (0..3).map(|c| m[r][c] * half[c]).sum::<f64>();
    }
    SourceGrid { dims, affine: m }
}

/// Rotation by `angle` radians about the unit `axis` (Rodrigues).
pub fn rotation(axis: [f64; 3], angle: f64) -> Mat4 {
    let (s, c) = angle.sin_cos();
    let [x, y, z] = axis;
    let t = 1.0 - c;
    [
        [t * x * x + c, t * x * y - s * z, t * x * z + s * y, 0.0],
        [t * x * y + s * z, t * y * y + c, t * y * z - s * x, 0.0],
        [t * x * z - s * y, t * y * z + s * x, t * z * z + c, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// Anatomy space -> world: the head's size (by sex, with spread), a small tilt and a shift,
/// placing the brain centre near MNI (0, -18, 8).
pub fn random_pose(male: bool, rng: &mut impl Rng) -> Mat4 {
    let size = if male { 1.03 } else { 0.97 } * uniform(rng, 0.95, 1.05);
    let tilt = rotation(unit_vector(rng), uniform(rng, 0.0, 6.0).to_radians());
    let mut scale = IDENTITY;
    for (a, row) in scale.iter_mut().take(3).enumerate() {
        row[a] = size;
    }
    let mut pose = mul(&tilt, &scale);
    let centre = [0.0, -18.0, 8.0];
    for (r, c) in centre.iter().enumerate() {
        pose[r][3] = c + uniform(rng, -6.0, 6.0);
    }
    pose
}

/// How a subject's image goes to disk, as scanners and converters do it.
pub fn random_encoding(max_value: f32, rng: &mut impl Rng) -> Encoding {
    let u = rng.random::<f64>();
    if u < 0.3 {
        Encoding::Float32
    } else if u < 0.6 || max_value <= 0.0 {
        Encoding::Int16 { slope: 1.0 }
    } else {
        // A slope that spreads the range over most of int16, never exactly 1.
        let target = uniform(rng, 12_000.0, 30_000.0) as f32;
        Encoding::Int16 {
            slope: max_value / target,
        }
    }
}

/// A site: a scanner's contrast, noise level and intensity scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    pub name: &'static str,
    pub contrast: Contrast,
    /// Noise standard deviation relative to white matter.
    pub noise: f32,
    /// Scanner units per white-matter signal.
    pub gain: f32,
}

pub const SITE_NAMES: [&str; 3] = ["SITE-A", "SITE-B", "SITE-C"];

pub fn site(index: usize) -> Site {
    let base = Contrast::default();
    match index % 3 {
        0 => Site {
            name: SITE_NAMES[0],
            contrast: base,
            noise: 0.025,
            gain: 1000.0,
        },
        1 => Site {
            name: SITE_NAMES[1],
            contrast: Contrast {
                gm: base.gm * 1.05,
                deep_gm: base.deep_gm * 1.04,
                csf: base.csf * 1.15,
                ..base
            },
            noise: 0.035,
            gain: 640.0,
        },
        _ => Site {
            name: SITE_NAMES[2],
            contrast: Contrast {
                gm: base.gm * 0.95,
                csf: base.csf * 0.85,
                scalp: base.scalp * 1.1,
                ..base
            },
            noise: 0.02,
            gain: 1450.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::random::subject_rng;
    use super::*;
    use crate::data::geometry::{axcodes, voxel_sizes};

    #[test]
    fn grids_vary_in_orientation_and_stay_valid() {
        let mut codes = std::collections::BTreeSet::new();
        for i in 0..64 {
            let g = random_grid([0.0, -18.0, 0.0], &mut subject_rng(3, "t", i, "grid"));
            for v in voxel_sizes(&g.affine) {
                assert!((0.899..=1.501).contains(&v), "{v}");
            }
            let fov: Vec<f64> = (0..3)
                .map(|k| g.dims[k] as f64 * voxel_sizes(&g.affine)[k])
                .collect();
            assert!(fov.iter().all(|f| *f > 170.0), "{fov:?}");
            codes.insert(axcodes(&g.affine));
        }
        assert!(codes.len() > 15, "{codes:?}");
    }

    #[test]
    fn encodings_mix_float_int16_and_scaled_int16() {
        let (mut float, mut plain, mut scaled) = (0, 0, 0);
        for i in 0..60 {
            match random_encoding(1400.0, &mut subject_rng(1, "t", i, "encoding")) {
                Encoding::Float32 => float += 1,
                Encoding::Int16 { slope: 1.0 } => plain += 1,
                Encoding::Int16 { .. } => scaled += 1,
                Encoding::UInt8 => unreachable!("images are never uint8"),
            }
        }
        assert!(
            float > 8 && plain > 8 && scaled > 8,
            "{float} {plain} {scaled}"
        );
    }
}
