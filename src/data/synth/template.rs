//! Anatomy from a real T1 (e.g. Colin27): the template is read once, its tissues estimated from
//! intensity, and each subject warps it: ventricles expand, the medial temporal lobe and the
//! brain shrink, the cortex thins (grey matter blends into CSF near the brain's edge). The
//! template must be in MNI space (Colin27, MNI152): the landmarks below are MNI coordinates.
use super::anatomy::{Anatomy, Contrast, Tissue};
use super::atrophy::Atrophy;
use crate::data::geometry::{Mat4, apply, inverse};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Where the phantom's head middle sits in anatomy space (the field of view's centre).
pub const PHANTOM_HEAD_MIDDLE: [f64; 3] = [0.0, -3.0, -6.0];
/// Box (MNI mm) that holds the lateral and third ventricles: deep CSF inside it is ventricle.
const VENTRICLE_BOX: [[f64; 2]; 3] = [[-32.0, 32.0], [-48.0, 32.0], [-6.0, 34.0]];
/// Hippocampus centre (right side, MNI mm) and how far its shrinkage reaches.
const HIPPOCAMPUS_MNI: [f64; 3] = [28.0, -22.0, -14.0];
const HIPPOCAMPUS_REACH_MM: f64 = 11.0;
/// How far (mm^2 per unit of volume growth) the ventricle walls move along the ventricle
/// field's gradient: about 3 mm per wall for a doubled ventricle volume.
const VENTRICLE_PUSH: f64 = 38.0;
/// Normalised intensity thresholds between CSF, grey and white matter (white matter = 1).
const CSF_BELOW: f32 = 0.45;
const GM_BELOW: f32 = 0.82;

/// A loaded template: intensities normalised so white matter is about 1, plus a smoothed
/// foreground mask that says how close a point is to the brain's edge.
pub struct Template {
    dims: [usize; 3],
    world_to_voxel: Mat4,
    /// Template world position of the anatomy-space origin.
    centre: [f64; 3],
    /// Per voxel: signal, the foreground mask box-blurred over ~7 mm (1 deep inside, 0.5 at
    /// the edge, 0 outside), and the ventricle mask blurred the same way.
    channels: Vec<[f32; 3]>,
}

impl Template {
    pub fn load(path: &Path) -> Result<Self> {
        // The project's reader validates the file and picks sform, qform or voxel sizes.
        let image = crate::data::nifti::read::read_image(path, None)
            .with_context(|| format!("{}: cannot use as a template", path.display()))?;
        let (dims, affine, raw) = (image.dims, image.affine, image.data);
        // The reader has already refused singular affines.
        let world_to_voxel =
            inverse(&affine).with_context(|| format!("{}: singular affine", path.display()))?;
        let mut sorted: Vec<f32> = raw.iter().copied().filter(|v| *v > 0.0).collect();
        if sorted.len() < 1000 {
            bail!("{}: template has almost no foreground", path.display());
        }
        let high = *percentile(&mut sorted, 0.99);
        let mask: Vec<f32> = raw.iter().map(|&v| f32::from(v > 0.08 * high)).collect();
        let mut fg: Vec<f32> = raw
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m > 0.0)
            .map(|(v, _)| *v)
            .collect();
        // White matter is the brightest large class of a T1: its level sits high in the
        // foreground histogram.
        let wm = percentile(&mut fg, 0.85).max(1e-6);
        let signal: Vec<f32> = raw.iter().zip(&mask).map(|(v, m)| m * v / wm).collect();
        let (mut lo, mut hi) = ([f64::INFINITY; 3], [f64::NEG_INFINITY; 3]);
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    if mask[i + dims[0] * (j + dims[1] * k)] > 0.0 {
                        let w = apply(&affine, [i as f64, j as f64, k as f64]);
                        for a in 0..3 {
                            lo[a] = lo[a].min(w[a]);
                            hi[a] = hi[a].max(w[a]);
                        }
                    }
                }
            }
        }
        // The scanner centres its field of view at anatomy (0, -3, -6), the middle of the
        // phantom's head: put the template's foreground box (brain or whole head) there.
        let centre = [0, 1, 2].map(|a| 0.5 * (lo[a] + hi[a]) - PHANTOM_HEAD_MIDDLE[a]);
        let vox_mm = crate::data::geometry::voxel_sizes(&affine);
        let radius = vox_mm.map(|v| ((3.5 / v).round() as usize).max(1));
        let inner = box_blur(&mask, dims, radius);
        let mut deep_csf = vec![0.0f32; signal.len()];
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let at = i + dims[0] * (j + dims[1] * k);
                    let w = apply(&affine, [i as f64, j as f64, k as f64]);
                    let in_box =
                        (0..3).all(|a| (VENTRICLE_BOX[a][0]..VENTRICLE_BOX[a][1]).contains(&w[a]));
                    if in_box && signal[at] < CSF_BELOW && inner[at] > 0.97 {
                        deep_csf[at] = 1.0;
                    }
                }
            }
        }
        let ventricles = box_blur(&deep_csf, dims, radius);
        let channels = (0..signal.len())
            .map(|i| [signal[i], inner[i], ventricles[i]])
            .collect();
        Ok(Self {
            dims,
            world_to_voxel,
            centre,
            channels,
        })
    }

    /// Trilinear samples of (signal, inner, ventricles) at template world `p`; zero outside.
    fn sample(&self, p: [f64; 3]) -> [f32; 3] {
        let v = apply(&self.world_to_voxel, p);
        let mut base = [0usize; 3];
        let mut t = [0f32; 3];
        for a in 0..3 {
            if !(v[a] >= 0.0 && v[a] <= (self.dims[a] - 1) as f64) {
                return [0.0; 3];
            }
            let b = (v[a] as usize).min(self.dims[a].saturating_sub(2));
            base[a] = b;
            t[a] = (v[a] - b as f64) as f32;
        }
        let (sx, sy, sz) = (1, self.dims[0], self.dims[0] * self.dims[1]);
        let at = base[0] + base[1] * sy + base[2] * sz;
        let mut out = [0.0f32; 3];
        for (dx, dy, dz) in [
            (0, 0, 0),
            (1, 0, 0),
            (0, 1, 0),
            (1, 1, 0),
            (0, 0, 1),
            (1, 0, 1),
            (0, 1, 1),
            (1, 1, 1),
        ] {
            let w = (if dx == 1 { t[0] } else { 1.0 - t[0] })
                * (if dy == 1 { t[1] } else { 1.0 - t[1] })
                * (if dz == 1 { t[2] } else { 1.0 - t[2] });
            let idx = (at + dx * sx + dy * sy + dz * sz).min(self.channels.len() - 1);
            for (o, c) in out.iter_mut().zip(&self.channels[idx]) {
                *o += w * c;
            }
        }
        out
    }

    /// Whether anatomy-space `q` lies well inside the template's brain.
    pub fn is_deep_inside(&self, q: [f64; 3]) -> bool {
        self.sample(self.to_world(q))[1] > 0.99
    }

    fn to_world(&self, q: [f64; 3]) -> [f64; 3] {
        [0, 1, 2].map(|a| q[a] + self.centre[a])
    }
}

fn percentile(values: &mut [f32], q: f64) -> &f32 {
    let at = ((values.len() - 1) as f64 * q) as usize;
    values.select_nth_unstable_by(at, f32::total_cmp).1
}

/// Separable box blur with the given radius per axis (voxels), edges clamped.
fn box_blur(data: &[f32], dims: [usize; 3], radius: [usize; 3]) -> Vec<f32> {
    let mut cur = data.to_vec();
    let strides = [1, dims[0], dims[0] * dims[1]];
    for axis in 0..3 {
        let n = dims[axis];
        let r = radius[axis] as isize;
        let stride = strides[axis];
        let mut next = vec![0.0f32; cur.len()];
        let mut line = vec![0.0f32; n + 1];
        for start in 0..cur.len() {
            // Lines start where the axis index is zero.
            if (start / stride) % n != 0 {
                continue;
            }
            line[0] = 0.0;
            for i in 0..n {
                line[i + 1] = line[i] + cur[start + i * stride];
            }
            for i in 0..n as isize {
                let lo = (i - r).max(0) as usize;
                let hi = ((i + r + 1) as usize).min(n);
                next[start + i as usize * stride] = (line[hi] - line[lo]) / (hi - lo) as f32;
            }
        }
        cur = next;
    }
    cur
}

/// One subject's view of the template: the atrophy warps and the site's contrast.
pub struct TemplateAnatomy<'a> {
    template: &'a Template,
    atrophy: Atrophy,
    contrast: Contrast,
}

impl<'a> TemplateAnatomy<'a> {
    pub fn new(template: &'a Template, atrophy: Atrophy, contrast: Contrast) -> Self {
        Self {
            template,
            atrophy,
            contrast,
        }
    }

    /// Where the subject's point `q` is read from, in template world coordinates.
    fn source_point(&self, q: [f64; 3]) -> [f64; 3] {
        let a = &self.atrophy;
        let t = self.template;
        let mut p = t.to_world(q.map(|v| v / a.brain_scale));
        // Ventricles grow by reading from further inside them: step up the ventricle field.
        let growth = (a.ventricles[0] * a.ventricles[1] * a.ventricles[2]).cbrt() - 1.0;
        // The ventricle field is zero beyond its blur outside the box: skip the lookups there.
        let near_ventricles =
            (0..3).all(|k| p[k] > VENTRICLE_BOX[k][0] - 8.0 && p[k] < VENTRICLE_BOX[k][1] + 8.0);
        if near_ventricles && growth > 0.0 && t.sample(p)[2] > 0.0 {
            let h = 1.0;
            let mut grad = [0.0; 3];
            for (ax, g) in grad.iter_mut().enumerate() {
                let (mut lo, mut hi) = (p, p);
                lo[ax] -= h;
                hi[ax] += h;
                *g = (t.sample(hi)[2] - t.sample(lo)[2]) as f64 / (2.0 * h);
            }
            for ax in 0..3 {
                p[ax] += VENTRICLE_PUSH * growth * grad[ax];
            }
        }
        let side = if p[0] < 0.0 { -1.0 } else { 1.0 };
        let hippocampus = [
            HIPPOCAMPUS_MNI[0] * side,
            HIPPOCAMPUS_MNI[1],
            HIPPOCAMPUS_MNI[2],
        ];
        radial_warp(p, hippocampus, HIPPOCAMPUS_REACH_MM, a.hippocampus)
    }
}

/// Scales the neighbourhood of `centre` by `scale` (> 1 grows what is there), fading out over
/// `reach` mm: the point at `q` reads from closer to (or farther from) the centre.
fn radial_warp(q: [f64; 3], centre: [f64; 3], reach: f64, scale: f64) -> [f64; 3] {
    let d = [0, 1, 2].map(|a| q[a] - centre[a]);
    let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    if r2 > 9.0 * reach * reach {
        // exp(-9): the warp has faded to nothing.
        return q;
    }
    let w = (-r2 / (reach * reach)).exp();
    let f = 1.0 + (1.0 / scale - 1.0) * w;
    [0, 1, 2].map(|a| centre[a] + d[a] * f)
}

impl Anatomy for TemplateAnatomy<'_> {
    fn sample(&self, q: [f64; 3]) -> (Tissue, f32) {
        let [mut s, inner, ventricle] = self.template.sample(self.source_point(q));
        if inner <= 0.0 && s <= 0.0 {
            return (Tissue::Background, 0.0);
        }
        let load = self.atrophy.load as f32;
        let csf = self.contrast.csf;
        if s < GM_BELOW {
            // Cortical thinning and sulcal widening: grey matter near the edge, and anything
            // already partly CSF, slides towards CSF with the atrophy load.
            let edge = ((0.95 - inner) / 0.45).clamp(0.0, 1.0);
            let partial = ((0.6 - s) / 0.3).clamp(0.0, 1.0);
            let t = (load * (0.6 * edge + 0.4 * partial)).min(0.85);
            s += (csf - s) * t;
        }
        // Map the template's tissue levels onto the site's contrast.
        let tissue = if s < CSF_BELOW {
            if ventricle > 0.5 {
                Tissue::Ventricle
            } else {
                Tissue::Csf
            }
        } else if s < GM_BELOW {
            Tissue::CorticalGm
        } else {
            Tissue::Wm
        };
        let gain = match tissue {
            Tissue::Csf | Tissue::Ventricle => csf / Contrast::default().csf,
            Tissue::CorticalGm => self.contrast.gm / Contrast::default().gm,
            _ => self.contrast.wm,
        };
        (tissue, s * gain)
    }
}
