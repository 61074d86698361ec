//! What the renderer asks of an anatomy (the phantom or a warped template): a tissue class and
//! a T1 signal at a point of anatomy space. Also the tissue contrasts, which a site shifts.
/// Tissue classes of the head (the phantom knows them exactly; a template estimates them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tissue {
    Background,
    Scalp,
    Skull,
    /// Extra-cerebral and sulcal CSF (and the temporal horn).
    Csf,
    Ventricle,
    CorticalGm,
    DeepGm,
    Hippocampus,
    Wm,
}

impl Tissue {
    /// Brain parenchyma: where oedema can spread.
    pub fn is_parenchyma(self) -> bool {
        matches!(
            self,
            Tissue::CorticalGm | Tissue::DeepGm | Tissue::Hippocampus | Tissue::Wm
        )
    }
}

/// T1-weighted signal per tissue, white matter = 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Contrast {
    pub csf: f32,
    pub gm: f32,
    pub deep_gm: f32,
    pub wm: f32,
    pub skull: f32,
    pub scalp: f32,
}

impl Default for Contrast {
    fn default() -> Self {
        Self {
            csf: 0.22,
            gm: 0.62,
            deep_gm: 0.70,
            wm: 1.0,
            skull: 0.08,
            scalp: 0.85,
        }
    }
}

impl Contrast {
    #[inline]
    pub fn of(&self, t: Tissue) -> f32 {
        match t {
            Tissue::Background => 0.0,
            Tissue::Scalp => self.scalp,
            Tissue::Skull => self.skull,
            Tissue::Csf | Tissue::Ventricle => self.csf,
            Tissue::CorticalGm | Tissue::Hippocampus => self.gm,
            Tissue::DeepGm => self.deep_gm,
            Tissue::Wm => self.wm,
        }
    }
}

/// An anatomy in its own space (mm, RAS, brain centre at the origin).
pub trait Anatomy: Sync {
    /// Tissue class and T1 signal (white matter about 1) at `q`.
    fn sample(&self, q: [f64; 3]) -> (Tissue, f32);
}
