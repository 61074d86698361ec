//! Smooth random fields: value noise (for cortical folding), sums of random plane waves (for
//! deformations and bias), and a lattice that caches any smooth field and interpolates it
//! trilinearly, because evaluating the fields at every voxel would dominate the run time.
use super::random::{uniform, unit_vector};
use rand::Rng;

/// A field with `C` channels sampled every `step` mm on a box, trilinear in between; points
/// outside the box take the nearest face's values (the fields are smooth, the box generous).
pub struct Lattice<const C: usize> {
    origin: [f64; 3],
    inv_step: f64,
    dims: [usize; 3],
    values: Vec<[f32; C]>,
}

impl<const C: usize> Lattice<C> {
    pub fn build(lo: [f64; 3], hi: [f64; 3], step: f64, f: impl Fn([f64; 3]) -> [f32; C]) -> Self {
        let dims = [0, 1, 2].map(|a| ((hi[a] - lo[a]) / step).ceil() as usize + 1);
        let mut values = Vec::with_capacity(dims[0] * dims[1] * dims[2]);
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let p = [
                        lo[0] + i as f64 * step,
                        lo[1] + j as f64 * step,
                        lo[2] + k as f64 * step,
                    ];
                    values.push(f(p));
                }
            }
        }
        Self {
            origin: lo,
            inv_step: 1.0 / step,
            dims,
            values,
        }
    }

    #[inline]
    pub fn sample(&self, p: [f64; 3]) -> [f32; C] {
        let mut base = [0usize; 3];
        let mut frac = [0f32; 3];
        for a in 0..3 {
            let x = ((p[a] - self.origin[a]) * self.inv_step).clamp(0.0, (self.dims[a] - 1) as f64);
            let b = (x as usize).min(self.dims[a].saturating_sub(2));
            base[a] = b;
            frac[a] = (x - b as f64) as f32;
        }
        let (sx, sy) = (1, self.dims[0]);
        let sz = self.dims[0] * self.dims[1];
        let at = base[0] + base[1] * sy + base[2] * sz;
        let mut out = [0f32; C];
        for (corner, w) in [
            (0, (1.0 - frac[0]) * (1.0 - frac[1]) * (1.0 - frac[2])),
            (sx, frac[0] * (1.0 - frac[1]) * (1.0 - frac[2])),
            (sy, (1.0 - frac[0]) * frac[1] * (1.0 - frac[2])),
            (sx + sy, frac[0] * frac[1] * (1.0 - frac[2])),
            (sz, (1.0 - frac[0]) * (1.0 - frac[1]) * frac[2]),
            (sx + sz, frac[0] * (1.0 - frac[1]) * frac[2]),
            (sy + sz, (1.0 - frac[0]) * frac[1] * frac[2]),
            (sx + sy + sz, frac[0] * frac[1] * frac[2]),
        ] {
            let v = &self.values[(at + corner).min(self.values.len() - 1)];
            for c in 0..C {
                out[c] += w * v[c];
            }
        }
        out
    }
}

impl Lattice<1> {
    /// `|f| / |grad f|` at each node (central differences): near the zero set of `f` this is
    /// the distance to it in mm, whatever the local slope, so bands around it keep their width.
    pub fn distance_to_zero_set(&self) -> Lattice<1> {
        let [nx, ny, nz] = self.dims;
        let step = 1.0 / self.inv_step;
        let at = |i: usize, j: usize, k: usize| self.values[i + nx * (j + ny * k)][0] as f64;
        let mut values = Vec::with_capacity(self.values.len());
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let d = |lo: f64, hi: f64, span: usize| (hi - lo) / (span as f64 * step);
                    let (i0, i1) = (i.saturating_sub(1), (i + 1).min(nx - 1));
                    let (j0, j1) = (j.saturating_sub(1), (j + 1).min(ny - 1));
                    let (k0, k1) = (k.saturating_sub(1), (k + 1).min(nz - 1));
                    let gx = d(at(i0, j, k), at(i1, j, k), (i1 - i0).max(1));
                    let gy = d(at(i, j0, k), at(i, j1, k), (j1 - j0).max(1));
                    let gz = d(at(i, j, k0), at(i, j, k1), (k1 - k0).max(1));
                    let g = (gx * gx + gy * gy + gz * gz).sqrt().max(1e-9);
                    values.push([(at(i, j, k).abs() / g).min(1e3) as f32]);
                }
            }
        }
        Lattice {
            origin: self.origin,
            inv_step: self.inv_step,
            dims: self.dims,
            values,
        }
    }
}

/// Value noise: random values at integer lattice points, smoothstep-interpolated; about
/// [-1, 1]. Octaves of it make gyri and sulci.
#[derive(Clone, Copy, Debug)]
pub struct ValueNoise {
    key: u64,
}

impl ValueNoise {
    pub fn new(rng: &mut impl Rng) -> Self {
        Self {
            key: rng.next_u64(),
        }
    }

    fn lattice_value(&self, i: i64, j: i64, k: i64) -> f64 {
        // splitmix64 finaliser over the packed coordinates: cheap and well mixed.
        let mut z = self.key
            ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (j as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ (k as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }

    pub fn sample(&self, p: [f64; 3]) -> f64 {
        let f = p.map(f64::floor);
        let t = [0, 1, 2].map(|a| {
            let x = p[a] - f[a];
            x * x * (3.0 - 2.0 * x)
        });
        let (i, j, k) = (f[0] as i64, f[1] as i64, f[2] as i64);
        let lerp = |a: f64, b: f64, t: f64| a + (b - a) * t;
        let mut zs = [0.0; 2];
        for (dz, z) in zs.iter_mut().enumerate() {
            let mut ys = [0.0; 2];
            for (dy, y) in ys.iter_mut().enumerate() {
                let a = self.lattice_value(i, j + dy as i64, k + dz as i64);
                let b = self.lattice_value(i + 1, j + dy as i64, k + dz as i64);
                *y = lerp(a, b, t[0]);
            }
            *z = lerp(ys[0], ys[1], t[1]);
        }
        lerp(zs[0], zs[1], t[2])
    }

    /// `octaves` octaves starting at wavelength `wavelength` mm, each half the size and half
    /// the weight of the previous.
    pub fn fractal(&self, p: [f64; 3], wavelength: f64, octaves: usize) -> f64 {
        let (mut sum, mut weight, mut freq) = (0.0, 1.0, 1.0 / wavelength);
        for o in 0..octaves {
            // Shift each octave so their lattices do not line up.
            let shift = 17.31 * o as f64;
            sum += weight * self.sample(p.map(|x| x * freq + shift));
            weight *= 0.5;
            freq *= 2.0;
        }
        sum
    }
}

/// A sum of random plane waves with wavelengths in a range: a cheap smooth random field.
#[derive(Clone, Debug)]
pub struct Waves {
    waves: Vec<([f64; 3], f64, f64)>,
}

impl Waves {
    /// `count` waves, wavelengths uniform in [min_wl, max_wl] mm, amplitudes summing to about
    /// `amplitude`.
    pub fn new(rng: &mut impl Rng, count: usize, min_wl: f64, max_wl: f64, amplitude: f64) -> Self {
        let waves = (0..count)
            .map(|_| {
                let k = std::f64::consts::TAU / uniform(rng, min_wl, max_wl);
                let dir = unit_vector(rng).map(|d| d * k);
                let phase = uniform(rng, 0.0, std::f64::consts::TAU);
                let amp = amplitude / count as f64 * uniform(rng, 0.5, 1.5);
                (dir, phase, amp)
            })
            .collect();
        Self { waves }
    }

    pub fn at(&self, p: [f64; 3]) -> f64 {
        self.waves
            .iter()
            .map(|(k, ph, a)| a * (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + ph).sin())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lattice_interpolates_a_linear_field_exactly() {
        let lat = Lattice::build([-10.0, -5.0, 0.0], [10.0, 5.0, 8.0], 2.0, |p| {
            [(p[0] + 2.0 * p[1] - p[2]) as f32]
        });
        for p in [[0.3, 1.7, 2.2], [-9.9, 4.9, 7.9], [5.0, -3.3, 0.1]] {
            let want = p[0] + 2.0 * p[1] - p[2];
            assert!((lat.sample(p)[0] as f64 - want).abs() < 1e-4);
        }
    }

    #[test]
    fn value_noise_is_bounded_and_continuous() {
        let mut rng = super::super::random::subject_rng(0, "t", 0, "t");
        let n = ValueNoise::new(&mut rng);
        let mut prev = n.sample([0.0, 0.0, 0.0]);
        for s in 1..2000 {
            let v = n.sample([s as f64 * 0.01, s as f64 * 0.007, 0.3]);
            assert!(v.abs() <= 1.0);
            assert!((v - prev).abs() < 0.05);
            prev = v;
        }
    }
}
