//! How age and diagnosis change the anatomy: one set of numbers per subject that both the
//! phantom and the template warp read. Age atrophy accelerates late in life and varies between
//! people; AD adds medial-temporal and global atrophy on top, so age alone does not explain it.
use super::random::uniform;
use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnosis {
    Cn,
    Ad,
}

impl Diagnosis {
    pub fn code(self) -> &'static str {
        match self {
            Diagnosis::Cn => "CN",
            Diagnosis::Ad => "AD",
        }
    }
}

/// Atrophy of one subject, in the phantom's units (mm and scale factors).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Atrophy {
    /// Overall load: 0 for a young adult, about 1 for a 90-year-old, more with AD.
    pub load: f64,
    /// Lateral-ventricle scale per axis (x, y, z); grows with load.
    pub ventricles: [f64; 3],
    /// Cortical grey matter thickness, mm.
    pub cortex_mm: f64,
    /// Half-width of the CSF in a sulcus, mm.
    pub sulcus_mm: f64,
    /// Depth of the sulci below the brain surface, mm.
    pub sulcus_depth_mm: f64,
    /// Half-width of the interhemispheric fissure, mm.
    pub fissure_mm: f64,
    /// Brain size relative to the skull (1 = no shrinkage): the gap fills with CSF.
    pub brain_scale: f64,
    /// Hippocampus scale (1 = young and healthy); the lost volume becomes CSF.
    pub hippocampus: f64,
}

impl Atrophy {
    pub fn new(age: f64, diagnosis: Diagnosis, rng: &mut impl Rng) -> Self {
        let years = ((age - 20.0) / 70.0).clamp(0.0, 1.0);
        // Brain ageing is slow before 60 and faster after: a convex curve of age.
        let ageing = years.powf(1.6) * uniform(rng, 0.75, 1.25);
        // Drawn for everyone, so a subject's later draws do not depend on the diagnosis.
        let severity = uniform(rng, 0.8, 1.2);
        let ad = match diagnosis {
            Diagnosis::Cn => 0.0,
            Diagnosis::Ad => severity,
        };
        let load = ageing + 0.25 * ad;
        let baseline_ventricles = uniform(rng, 0.85, 1.15);
        Self {
            load,
            ventricles: [
                baseline_ventricles * (1.0 + 0.9 * load),
                baseline_ventricles.sqrt() * (1.0 + 0.35 * load),
                baseline_ventricles * (1.0 + 0.8 * load),
            ],
            cortex_mm: uniform(rng, 2.8, 3.2) - 0.8 * load,
            sulcus_mm: 0.5 + 1.3 * load,
            sulcus_depth_mm: 16.0 + 4.0 * load,
            fissure_mm: 1.0 + 2.0 * load,
            brain_scale: 1.0 - 0.045 * load,
            hippocampus: 1.0 - 0.12 * ageing - ad * uniform(rng, 0.2, 0.3),
        }
    }
}
