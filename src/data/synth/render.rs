//! Rendering one subject onto its source grid: every voxel centre goes through the affine to
//! world, through the inverse pose and the smooth deformation to anatomy space, where the
//! anatomy (and a tumour) give the signal; then the bias field and Rician noise.
use super::anatomy::Anatomy;
use super::fields::{Lattice, Waves};
use super::random::normal_pair;
use super::scanner::SourceGrid;
use super::tumour::{Tumour, tumour_signal};
use crate::data::geometry::{Mat4, mul};
use rand::Rng;

/// The smooth per-subject fields, cached on a coarse lattice in anatomy space: displacement
/// (x, y, z, mm) and log bias.
pub struct SmoothFields {
    lattice: Lattice<4>,
}

/// Lattice spacing for the smooth fields: their shortest wavelength is ~50 mm, so 8 mm
/// nodes interpolate them to well under a tenth of a millimetre.
const FIELD_STEP: f64 = 8.0;

impl SmoothFields {
    /// A deformation of a few mm with 50-150 mm wavelengths and a bias of about +-15%.
    pub fn random(rng: &mut impl Rng) -> Self {
        let disp = [0, 1, 2].map(|_| Waves::new(rng, 5, 50.0, 150.0, 3.0));
        let bias = Waves::new(rng, 4, 120.0, 300.0, 0.15);
        let lattice = Lattice::build(
            [-112.0, -136.0, -128.0],
            [112.0, 136.0, 120.0],
            FIELD_STEP,
            |p| {
                [
                    disp[0].at(p) as f32,
                    disp[1].at(p) as f32,
                    disp[2].at(p) as f32,
                    bias.at(p) as f32,
                ]
            },
        );
        Self { lattice }
    }
}

/// A rendered subject on its source grid: the signal (white matter about 1) and, with a
/// tumour, its BraTS labels; NIfTI order (i fastest).
pub struct Rendered {
    pub image: Vec<f32>,
    pub labels: Option<Vec<u8>>,
}

/// Everything that decides one subject's voxels.
pub struct Scene<'a> {
    pub grid: &'a SourceGrid,
    /// World -> anatomy space (the inverse of the head's pose).
    pub world_to_anatomy: Mat4,
    pub fields: &'a SmoothFields,
    pub anatomy: &'a dyn Anatomy,
    pub tumour: Option<&'a Tumour>,
    /// Noise standard deviation, in white-matter units.
    pub noise: f32,
}

pub fn render(scene: &Scene, noise_rng: &mut impl Rng) -> Rendered {
    let [nx, ny, nz] = scene.grid.dims;
    let m = mul(&scene.world_to_anatomy, &scene.grid.affine);
    let mut image = Vec::with_capacity(nx * ny * nz);
    let mut labels = scene.tumour.map(|_| Vec::with_capacity(nx * ny * nz));
    let sigma = scene.noise;
    for k in 0..nz {
        for j in 0..ny {
            // Walk along i by adding the first column: one affine per row, not per voxel.
            let mut q0 = [0, 1, 2].map(|r| m[r][1] * j as f64 + m[r][2] * k as f64 + m[r][3]);
            let step = [m[0][0], m[1][0], m[2][0]];
            for _ in 0..nx {
                let f = scene.fields.lattice.sample(q0);
                let q = [
                    q0[0] + f[0] as f64,
                    q0[1] + f[1] as f64,
                    q0[2] + f[2] as f64,
                ];
                let (tissue, mut signal) = scene.anatomy.sample(q);
                if let (Some(t), Some(l)) = (scene.tumour, labels.as_mut()) {
                    let label = t.label(q, tissue);
                    signal = tumour_signal(label, signal);
                    l.push(label);
                }
                let value = signal * f[3].exp();
                // Magnitude of a complex signal with Gaussian noise in both channels: Rician,
                // so the background is Rayleigh-distributed, not zero.
                let (n1, n2) = normal_pair(noise_rng);
                let re = value + sigma * n1;
                let im = sigma * n2;
                image.push((re * re + im * im).sqrt());
                for a in 0..3 {
                    q0[a] += step[a];
                }
            }
        }
    }
    Rendered { image, labels }
}
