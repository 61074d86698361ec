//! The procedural head: a tissue class at any point of anatomy space (mm, RAS, the brain's
//! centre at the origin, MNI-sized), built from ellipsoids, a folded cortical ribbon made of
//! value noise, and the subject's atrophy. No external data.
use super::anatomy::{Anatomy, Contrast, Tissue};
use super::atrophy::Atrophy;
use super::fields::{Lattice, ValueNoise};
use rand::Rng;

/// Brain semi-axes, mm (about 136 x 168 x 116 mm overall, the size of an MNI brain).
pub const BRAIN_AXES: [f64; 3] = [68.0, 84.0, 58.0];
/// Scalp, skull and outer CSF thickness outside the (young) brain surface, mm.
const OUTER_CSF_MM: f64 = 2.5;
const SKULL_MM: f64 = 6.5;
const SCALP_MM: f64 = 6.0;
/// Folding wavelength of the gyri, mm, and the spacing the folding field is cached at.
const GYRUS_WAVELENGTH: f64 = 15.0;
const FOLDING_STEP: f64 = 2.0;

struct Ellipsoid {
    centre: [f64; 3],
    axes: [f64; 3],
}

impl Ellipsoid {
    const fn new(centre: [f64; 3], axes: [f64; 3]) -> Self {
        Self { centre, axes }
    }

    /// Squared normalised radius: < 1 inside.
    #[inline]
    fn rho2(&self, q: [f64; 3], scale: [f64; 3]) -> f64 {
        let mut s = 0.0;
        for a in 0..3 {
            let d = (q[a] - self.centre[a]) / (self.axes[a] * scale[a]);
            s += d * d;
        }
        s
    }
}

/// Deep grey-matter nuclei, one side (mirrored): thalamus, putamen, caudate head.
const DEEP_GM: [Ellipsoid; 3] = [
    Ellipsoid::new([10.0, -3.0, 1.0], [8.0, 13.0, 8.0]),
    Ellipsoid::new([24.0, 16.0, -5.0], [5.5, 13.0, 9.0]),
    Ellipsoid::new([13.0, 24.0, 8.0], [4.5, 10.0, 8.0]),
];
/// Cerebellum centre and semi-axes, mm (about 100 x 56 x 36 mm).
const CEREBELLUM: Ellipsoid = Ellipsoid::new([0.0, -50.0, -40.0], [50.0, 28.0, 18.0]);
/// Thickness of the CSF sheet between cerebrum and cerebellum, and the folium period, mm.
const TENTORIUM_MM: f64 = 2.0;
const FOLIUM_MM: f64 = 6.0;
/// Right lateral ventricle and hippocampus (mirrored for the left).
const VENTRICLE: Ellipsoid = Ellipsoid::new([8.0, 2.0, 10.0], [5.5, 22.0, 7.5]);
const HIPPOCAMPUS: Ellipsoid = Ellipsoid::new([28.0, -5.0, -21.0], [6.5, 16.0, 6.0]);
/// Height above which the interhemispheric fissure cuts down (above the corpus callosum).
const FISSURE_FLOOR_Z: f64 = 24.0;

pub struct Phantom {
    atrophy: Atrophy,
    contrast: Contrast,
    /// Distance (mm) to the nearest sulcal fundus sheet.
    folding: Lattice<1>,
}

impl Phantom {
    pub fn new(atrophy: Atrophy, contrast: Contrast, rng: &mut impl Rng) -> Self {
        let noise = ValueNoise::new(rng);
        let lo = BRAIN_AXES.map(|a| -a - 4.0);
        let hi = BRAIN_AXES.map(|a| a + 4.0);
        // Sulci run along the zero set of the noise; the lattice holds the distance to it.
        let folding = Lattice::build(lo, hi, FOLDING_STEP, |p| {
            [noise.fractal(p, GYRUS_WAVELENGTH, 2) as f32]
        })
        .distance_to_zero_set();
        Self {
            atrophy,
            contrast,
            folding,
        }
    }

    pub fn tissue(&self, q: [f64; 3]) -> Tissue {
        let a = &self.atrophy;
        let r = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt();
        let rho = BRAIN_AXES
            .iter()
            .zip(q)
            .map(|(ax, v)| (v / ax) * (v / ax))
            .sum::<f64>()
            .sqrt();
        // Distances along the ray from the centre: to the young brain surface, and to the
        // shrunken one (its depth inside the brain).
        let surface = if rho > 1e-9 { r / rho } else { f64::INFINITY };
        let outside = r - surface;
        let depth = surface * a.brain_scale - r;
        // The cerebellum: its own ellipsoid under the occipital lobe, with its own surface.
        let c = [0, 1, 2].map(|k| q[k] - CEREBELLUM.centre[k]);
        let rc = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
        let rho_c = (0..3)
            .map(|k| (c[k] / CEREBELLUM.axes[k]).powi(2))
            .sum::<f64>()
            .sqrt();
        let surface_c = if rho_c > 1e-9 {
            rc / rho_c
        } else {
            f64::INFINITY
        };
        let depth_c = surface_c * a.brain_scale - rc;
        let outside = outside.min(rc - surface_c);
        let in_stem = q[2] < -20.0 && q[2] > -95.0 && q[0] * q[0] + (q[1] + 14.0).powi(2) < 81.0;
        if in_stem && depth.max(depth_c) < 8.0 {
            return Tissue::Wm;
        }
        if outside > OUTER_CSF_MM + SKULL_MM + SCALP_MM {
            return Tissue::Background;
        }
        if depth_c > 0.0 {
            return cerebellar_tissue(c, rc, depth_c);
        }
        if depth <= 0.0 || depth_c > -TENTORIUM_MM {
            return if outside < OUTER_CSF_MM || depth > 0.0 {
                Tissue::Csf
            } else if outside < OUTER_CSF_MM + SKULL_MM {
                Tissue::Skull
            } else {
                Tissue::Scalp
            };
        }
        let side = [q[0].abs(), q[1], q[2]];
        let one = [1.0; 3];
        if side[0] > 1.0 && VENTRICLE.rho2(side, a.ventricles) < 1.0 {
            return Tissue::Ventricle;
        }
        if side[0] < 1.2 * a.ventricles[0]
            && (-12.0..8.0).contains(&q[1])
            && (-8.0..8.0).contains(&q[2])
        {
            return Tissue::Ventricle;
        }
        let h = HIPPOCAMPUS.rho2(side, one);
        if h < 1.1 * 1.1 {
            return if h < a.hippocampus * a.hippocampus {
                Tissue::Hippocampus
            } else {
                // The temporal horn widens where the hippocampus shrank.
                Tissue::Csf
            };
        }
        for nucleus in &DEEP_GM {
            if nucleus.rho2(side, one) < 1.0 {
                return Tissue::DeepGm;
            }
        }
        if q[2] > FISSURE_FLOOR_Z {
            if side[0] < a.fissure_mm {
                return Tissue::Csf;
            }
            if side[0] < a.fissure_mm + a.cortex_mm {
                return Tissue::CorticalGm;
            }
        }
        if depth < a.cortex_mm {
            return Tissue::CorticalGm;
        }
        if depth < a.sulcus_depth_mm + a.cortex_mm {
            let f = self.folding.sample(q)[0] as f64;
            if f < a.sulcus_mm && depth < a.sulcus_depth_mm {
                return Tissue::Csf;
            }
            if f < a.sulcus_mm + a.cortex_mm {
                return Tissue::CorticalGm;
            }
        }
        Tissue::Wm
    }
}

/// Folia: thin grey-matter leaves around white-matter branches, as concentric shells about
/// 3 mm thick, wobbling with the lateral position, and a white-matter core.
fn cerebellar_tissue(c: [f64; 3], rc: f64, depth: f64) -> Tissue {
    if depth < 1.2 {
        return Tissue::CorticalGm;
    }
    if depth > 12.0 {
        return Tissue::Wm;
    }
    let phase = std::f64::consts::TAU * rc / FOLIUM_MM + 0.8 * (c[0] / 9.0).sin() + c[1] / 7.0;
    if phase.sin() > -0.3 {
        Tissue::CorticalGm
    } else {
        Tissue::Wm
    }
}

impl Anatomy for Phantom {
    #[inline]
    fn sample(&self, q: [f64; 3]) -> (Tissue, f32) {
        let t = self.tissue(q);
        (t, self.contrast.of(t))
    }
}

#[cfg(test)]
mod tests {
    use super::super::atrophy::Diagnosis;
    use super::super::random::subject_rng;
    use super::*;

    /// Tissue volumes (ml) of a phantom on a 1.5 mm grid over the head.
    fn volumes(age: f64, diagnosis: Diagnosis) -> std::collections::HashMap<Tissue, f64> {
        // Same anatomy stream for both ages: only the atrophy differs.
        let mut rng = subject_rng(7, "test", 0, "atrophy");
        let atrophy = Atrophy::new(age, diagnosis, &mut rng);
        let phantom = Phantom::new(
            atrophy,
            Contrast::default(),
            &mut subject_rng(7, "test", 0, "anatomy"),
        );
        let step = 1.5;
        let mut out = std::collections::HashMap::new();
        let n = [0, 1, 2].map(|a| (2.0 * (BRAIN_AXES[a] + 2.0) / step) as i64);
        for k in 0..n[2] {
            for j in 0..n[1] {
                for i in 0..n[0] {
                    let q = [i, j, k].map(|v| v as f64 * step);
                    let q = [0, 1, 2].map(|a| q[a] - BRAIN_AXES[a] - 2.0);
                    *out.entry(phantom.tissue(q)).or_insert(0.0) += step.powi(3) / 1000.0;
                }
            }
        }
        out
    }

    #[test]
    fn ageing_grows_ventricles_and_csf_and_thins_grey_matter() {
        let young = volumes(25.0, Diagnosis::Cn);
        let old = volumes(85.0, Diagnosis::Cn);
        let v = |m: &std::collections::HashMap<Tissue, f64>, t| m.get(&t).copied().unwrap_or(0.0);
        assert!(v(&old, Tissue::Ventricle) > 2.0 * v(&young, Tissue::Ventricle));
        assert!(v(&old, Tissue::Csf) > 1.3 * v(&young, Tissue::Csf));
        assert!(v(&old, Tissue::CorticalGm) < v(&young, Tissue::CorticalGm));
        // Plausible adult volumes (ml): brain about 1.1-1.5 l, ventricles 10-80 ml.
        let brain: f64 = [
            Tissue::CorticalGm,
            Tissue::Wm,
            Tissue::DeepGm,
            Tissue::Hippocampus,
        ]
        .iter()
        .map(|t| v(&young, *t))
        .sum();
        assert!((900.0..1600.0).contains(&brain), "brain {brain} ml");
        assert!(
            (8.0..40.0).contains(&v(&young, Tissue::Ventricle)),
            "{young:?}"
        );
        let gm_fraction = v(&young, Tissue::CorticalGm) / brain;
        assert!(
            (0.3..0.6).contains(&gm_fraction),
            "cortical GM fraction {gm_fraction}"
        );
    }

    #[test]
    fn ad_shrinks_the_hippocampus_beyond_age() {
        let cn = volumes(75.0, Diagnosis::Cn);
        let ad = volumes(75.0, Diagnosis::Ad);
        let h = |m: &std::collections::HashMap<Tissue, f64>| m[&Tissue::Hippocampus];
        assert!(h(&ad) < 0.75 * h(&cn), "AD {} vs CN {}", h(&ad), h(&cn));
    }
}
