//! The triplet positive's augmentation: a random monotone non-linear intensity curve, a cubic
//! Bezier from (0, 0) to (1, 1) as in Models Genesis. Control points are sorted in x and in y,
//! which makes both coordinates non-decreasing in the curve parameter, so the curve is a
//! monotone map of [0, 1] onto itself.
use crate::rng;
use rand_chacha::ChaCha8Rng;

/// Points of the lookup table over [0, 1].
const LUT: usize = 1024;

/// A monotone intensity curve as a lookup table of `LUT + 1` values at x = i / LUT.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve(Vec<f32>);

impl Curve {
    /// A random curve from `rng`.
    pub fn random(rng: &mut ChaCha8Rng) -> Self {
        let mut xs = [rng::unit(rng), rng::unit(rng)];
        let mut ys = [rng::unit(rng), rng::unit(rng)];
        xs.sort_by(f64::total_cmp);
        ys.sort_by(f64::total_cmp);
        let bez = |p1: f64, p2: f64, t: f64| {
            let u = 1.0 - t;
            3.0 * u * u * t * p1 + 3.0 * u * t * t * p2 + t * t * t
        };
        // Sample the parametric curve densely, then resample it at even x by walking along
        // it (x(t) is non-decreasing, so one pass suffices).
        let samples = 8 * LUT;
        let pts: Vec<(f64, f64)> = (0..=samples)
            .map(|i| {
                let t = i as f64 / samples as f64;
                (bez(xs[0], xs[1], t), bez(ys[0], ys[1], t))
            })
            .collect();
        let mut lut = Vec::with_capacity(LUT + 1);
        let mut j = 0;
        for i in 0..=LUT {
            let x = i as f64 / LUT as f64;
            while j + 1 < pts.len() && pts[j + 1].0 < x {
                j += 1;
            }
            let (a, b) = (pts[j], pts[(j + 1).min(pts.len() - 1)]);
            let y = if b.0 > a.0 {
                a.1 + (b.1 - a.1) * ((x - a.0) / (b.0 - a.0)).clamp(0.0, 1.0)
            } else {
                a.1.max(b.1)
            };
            lut.push(y.clamp(0.0, 1.0) as f32);
        }
        // Rounding can leave tiny dips: enforce monotonicity exactly.
        for i in 1..lut.len() {
            lut[i] = lut[i].max(lut[i - 1]);
        }
        Curve(lut)
    }

    /// Maps intensities in [0, 1] (values outside are clamped first).
    pub fn apply(&self, values: &mut [f32]) {
        let scale = LUT as f32;
        for v in values {
            let x = v.clamp(0.0, 1.0) * scale;
            let i = (x as usize).min(LUT - 1);
            let f = x - i as f32;
            *v = self.0[i] + (self.0[i + 1] - self.0[i]) * f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_monotone_fix_the_ends_and_differ() {
        let mut seen = Vec::new();
        for s in 0..20 {
            let c = Curve::random(&mut rng::keyed(s, &[], "bezier"));
            assert!(c.0.windows(2).all(|w| w[0] <= w[1]));
            assert!(c.0[0].abs() < 1e-6 && (c.0[LUT] - 1.0).abs() < 1e-6);
            let mut v = vec![0.0, 0.25, 0.5, 0.75, 1.0, -3.0, 7.0];
            c.apply(&mut v);
            assert!(v.windows(2).take(4).all(|w| w[0] <= w[1]));
            assert_eq!(v[5], 0.0);
            assert!((v[6] - 1.0).abs() < 1e-6);
            seen.push(v[2]);
        }
        seen.sort_by(f32::total_cmp);
        assert!(seen[19] - seen[0] > 0.2, "curves barely differ: {seen:?}");
    }
}
