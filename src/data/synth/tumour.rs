//! A brain tumour with BraTS labels (1 necrotic core, 2 oedema, 4 enhancing rim): nested,
//! irregular shells around a centre inside the brain, 3 to 7 cm across, and what each label
//! does to the T1 signal.
use super::anatomy::Tissue;
use super::random::{uniform, unit_vector};
use rand::Rng;

pub const NECROTIC: u8 = 1;
pub const OEDEMA: u8 = 2;
pub const ENHANCING: u8 = 4;

#[derive(Clone, Debug)]
pub struct Tumour {
    pub centre: [f64; 3],
    core_mm: f64,
    rim_mm: f64,
    oedema_mm: f64,
    /// Lobes of the surface: direction, angular frequency, phase, amplitude.
    lobes: Vec<([f64; 3], f64, f64, f64)>,
}

impl Tumour {
    /// A tumour whose oedema fits inside an ellipsoid with semi-axes `brain_axes` (mm, centred
    /// at the origin), with a margin so the labels stay inside the brain, centred where
    /// `in_brain` holds (a template's mask; always true for the phantom).
    pub fn random(
        brain_axes: [f64; 3],
        in_brain: impl Fn([f64; 3]) -> bool,
        rng: &mut impl Rng,
    ) -> Self {
        // Log-uniform outer diameter from 3 to 7 cm, the span of BraTS's whole tumours
        // (oedema included: tens to a couple of hundred ml, spheres of about 3-7 cm).
        let oedema_mm = 15.0 * uniform(rng, 0.0, (35.0f64 / 15.0).ln()).exp();
        let rim_mm = (oedema_mm * uniform(rng, 0.45, 0.65)).max(4.0);
        let core_mm = (rim_mm * uniform(rng, 0.4, 0.65))
            .max(2.2)
            .min(rim_mm - 1.8);
        let oedema_mm = oedema_mm.max(rim_mm + 2.5);
        let room = brain_axes.map(|a| (a - oedema_mm * 1.3 - 10.0).max(5.0));
        let mut centre = [room[0] * 0.5, 0.0, 0.0];
        for _ in 0..10_000 {
            let p = room.map(|a| uniform(rng, -a, a));
            let inside: f64 = (0..3).map(|k| (p[k] / room[k]).powi(2)).sum();
            // Keep clear of the midline deep nuclei a little: most gliomas are lobar.
            if inside < 1.0 && (p[0].abs() > 12.0 || p[2] > 25.0) && in_brain(p) {
                centre = p;
                break;
            }
        }
        let lobes = (0..4)
            .map(|_| {
                (
                    unit_vector(rng),
                    uniform(rng, 1.5, 4.0),
                    uniform(rng, 0.0, std::f64::consts::TAU),
                    uniform(rng, 0.04, 0.09),
                )
            })
            .collect();
        Self {
            centre,
            core_mm,
            rim_mm,
            oedema_mm,
            lobes,
        }
    }

    /// Outer radius bound (mm): nothing is labelled farther from the centre.
    pub fn reach(&self) -> f64 {
        self.oedema_mm * 1.4
    }

    /// The label at `q` for tissue `tissue` (0 outside the tumour). Oedema spreads only
    /// through parenchyma; core and rim replace whatever was there.
    #[inline]
    pub fn label(&self, q: [f64; 3], tissue: Tissue) -> u8 {
        let d = [0, 1, 2].map(|a| q[a] - self.centre[a]);
        let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        let reach = self.reach();
        if r2 > reach * reach {
            return 0;
        }
        let r = r2.sqrt().max(1e-9);
        let dir = d.map(|v| v / r);
        let wobble: f64 = self
            .lobes
            .iter()
            .map(|(u, f, ph, amp)| {
                amp * (f * (u[0] * dir[0] + u[1] * dir[1] + u[2] * dir[2]) * 3.0 + ph).sin()
            })
            .sum();
        let shape = 1.0 + wobble;
        if r < self.core_mm * shape {
            NECROTIC
        } else if r < self.rim_mm * shape {
            ENHANCING
        } else if r < self.oedema_mm * (1.0 + 2.5 * wobble) && tissue.is_parenchyma() {
            OEDEMA
        } else {
            0
        }
    }
}

/// T1 signal inside a tumour label, given the healthy signal there (white matter = 1).
#[inline]
pub fn tumour_signal(label: u8, healthy: f32) -> f32 {
    match label {
        NECROTIC => 0.3,
        ENHANCING => 1.25,
        // Oedema is water: T1 darkens towards grey matter.
        OEDEMA => 0.72 * healthy + 0.05,
        _ => healthy,
    }
}
