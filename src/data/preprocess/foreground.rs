//! Finding the head/brain in a source volume: a robust intensity threshold (FSL BET's
//! brain/background rule: 10% of the way from the 2nd to the 98th percentile), which works
//! for full-head and skull-stripped images alike, and the centre of mass of what lies above it.
use super::source::SourceVolume;
use crate::data::geometry::{self, Mat4};

/// Every STRIDE-th voxel along each axis is enough for a threshold and a centre (1/27 of the
/// work at stride 3; a centre of mass over that many voxels is accurate to well under a
/// millimetre).
const STRIDE: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Foreground {
    /// Intensities above this are foreground.
    pub threshold: f32,
    /// Centre of mass of the binary foreground mask, in world millimetres (RAS+).
    pub centre_world: [f64; 3],
    /// Foreground voxels among the sampled ones; 0 means nothing stands out (flat image).
    pub sampled_count: usize,
}

/// Percentile `q` in [0, 1] of `values` with linear interpolation between order statistics
/// (numpy's default). Reorders `values`. None when empty.
pub fn percentile(values: &mut [f32], q: f64) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * (values.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let frac = (rank - lo as f64) as f32;
    let (_, &mut a, rest) = values.select_nth_unstable_by(lo, f32::total_cmp);
    if frac == 0.0 || rest.is_empty() {
        return Some(a);
    }
    let b = rest.iter().copied().fold(f32::INFINITY, f32::min);
    Some(a + (b - a) * frac)
}

/// Exact percentiles (numpy's linear interpolation) of `values` without reordering them: a
/// histogram finds the bins that hold the needed order statistics, and only those bins'
/// values are sorted. Linear time, and cheaper than selection on large inputs.
pub fn exact_percentiles(values: &[f32], qs: [f64; 2]) -> Option<[f32; 2]> {
    if values.is_empty() {
        return None;
    }
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi <= lo {
        return Some([lo, lo]);
    }
    const BINS: usize = 1 << 14;
    let scale = BINS as f32 / (hi - lo);
    let bin = |v: f32| (((v - lo) * scale) as usize).min(BINS - 1);
    let mut hist = vec![0usize; BINS + 1];
    for &v in values {
        hist[bin(v) + 1] += 1;
    }
    // hist[b] becomes the number of values in bins before b.
    for b in 1..=BINS {
        hist[b] += hist[b - 1];
    }
    let n = values.len();
    let ranks: Vec<(usize, f32)> = qs
        .iter()
        .map(|&q| {
            let r = q.clamp(0.0, 1.0) * (n - 1) as f64;
            (r.floor() as usize, (r - r.floor()) as f32)
        })
        .collect();
    let bin_of_rank = |k: usize| hist.partition_point(|&c| c <= k) - 1;
    let mut wanted: Vec<usize> = ranks
        .iter()
        .flat_map(|&(k, _)| [bin_of_rank(k), bin_of_rank((k + 1).min(n - 1))])
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    // bin -> 1 + its place in `wanted` (0: not wanted), one load per value.
    let mut slot = vec![0u8; BINS];
    for (i, &b) in wanted.iter().enumerate() {
        slot[b] = i as u8 + 1;
    }
    let mut members: Vec<Vec<f32>> = vec![Vec::new(); wanted.len()];
    for &v in values {
        let s = slot[bin(v)];
        if s > 0 {
            members[usize::from(s) - 1].push(v);
        }
    }
    members
        .iter_mut()
        .for_each(|m| m.sort_unstable_by(f32::total_cmp));
    let order_stat = |k: usize| {
        let b = bin_of_rank(k);
        let i = wanted.binary_search(&b).unwrap_or(0);
        members[i][k - hist[b]]
    };
    let [a, b] = [ranks[0], ranks[1]].map(|(k, frac)| {
        let x = order_stat(k);
        if frac == 0.0 || k + 1 >= n {
            x
        } else {
            x + (order_stat(k + 1) - x) * frac
        }
    });
    Some([a, b])
}

/// Every STRIDE-th voxel of the source along each axis, in NIfTI order: sample (a, b, c) is
/// source voxel (STRIDE a, STRIDE b, STRIDE c).
pub struct Samples {
    pub values: Vec<f32>,
    pub counts: [usize; 3],
}

impl Samples {
    pub fn take(src: &SourceVolume) -> Self {
        let dims = src.dims();
        let counts = dims.map(|d| d.div_ceil(STRIDE));
        let mut values = Vec::with_capacity(counts[0] * counts[1] * counts[2]);
        let mut scratch = vec![0.0f32; dims[0]];
        for k in (0..dims[2]).step_by(STRIDE) {
            for j in (0..dims[1]).step_by(STRIDE) {
                let row = src.row(j, k, &mut scratch);
                values.extend(row.iter().step_by(STRIDE));
            }
        }
        Self { values, counts }
    }

    /// Calls `f(source voxel index, value)` for every sample above `threshold`, in order.
    #[inline]
    fn for_each_above(&self, threshold: f32, mut f: impl FnMut([usize; 3], f32)) {
        let [n0, n1, n2] = self.counts;
        let mut rows = self.values.chunks_exact(n0);
        for c in 0..n2 {
            for b in 0..n1 {
                let Some(row) = rows.next() else { return };
                for (a, &v) in row.iter().enumerate() {
                    if v > threshold {
                        f([a * STRIDE, b * STRIDE, c * STRIDE], v);
                    }
                }
            }
        }
    }
}

/// Approximate percentiles from a 4096-bin histogram (interpolated within the bin): plenty
/// for a threshold, and linear time.
fn approx_percentiles<const N: usize>(values: &[f32], qs: [f64; N]) -> [f32; N] {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if values.is_empty() || hi <= lo {
        return [lo; N];
    }
    const BINS: usize = 4096;
    let scale = BINS as f32 / (hi - lo);
    let mut hist = vec![0usize; BINS];
    for &v in values {
        hist[(((v - lo) * scale) as usize).min(BINS - 1)] += 1;
    }
    let width = (hi - lo) / BINS as f32;
    qs.map(|q| {
        let rank = q * (values.len() - 1) as f64;
        let mut below = 0usize;
        for (b, &c) in hist.iter().enumerate() {
            if (below + c) as f64 > rank {
                let within = ((rank - below as f64 + 0.5) / c as f64) as f32;
                return lo + (b as f32 + within) * width;
            }
            below += c;
        }
        hi
    })
}

/// Threshold and centre of the foreground (`affine`: source voxel -> world).
pub fn find(samples: &Samples, affine: &Mat4) -> Foreground {
    let [p2, p98, max] = approx_percentiles(&samples.values, [0.02, 0.98, 1.0]);
    // An object smaller than 2% of the field of view leaves p98 at the background level:
    // measure from the maximum instead.
    let top = if p98 > p2 { p98 } else { max };
    let threshold = p2 + 0.1 * (top - p2);
    let mut sum = [0.0f64; 3];
    let mut count = 0usize;
    if top > p2 {
        let mut sums = [0usize; 3];
        samples.for_each_above(threshold, |ijk, _| {
            for a in 0..3 {
                sums[a] += ijk[a];
            }
            count += 1;
        });
        sum = sums.map(|s| s as f64);
    }
    let centre_voxel = if count > 0 {
        sum.map(|s| s / count as f64)
    } else {
        // Nothing stands out: the middle of the field of view is the best guess.
        let n = samples.counts;
        [0, 1, 2].map(|a| ((n[a] - 1) * STRIDE) as f64 / 2.0)
    };
    Foreground {
        threshold,
        centre_world: geometry::apply(affine, centre_voxel),
        sampled_count: count,
    }
}

/// How much of the foreground falls outside the grid box: the sampled fraction outside and,
/// per grid axis, how many millimetres stick out below and above.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cropping {
    pub fraction_outside: f64,
    pub below_mm: [f64; 3],
    pub above_mm: [f64; 3],
}

/// Measures the foreground outside a grid of `grid` voxels whose voxel -> world is
/// `grid_affine` (axis-aligned), from the source side.
pub fn cropping(
    samples: &Samples,
    affine: &Mat4,
    threshold: f32,
    grid_affine: &Mat4,
    grid: [usize; 3],
) -> Cropping {
    let Some(inv) = geometry::inverse(grid_affine) else {
        return Cropping::default();
    };
    let m = geometry::mul(&inv, affine);
    let spacing = geometry::voxel_sizes(grid_affine);
    let (mut inside, mut outside) = (0usize, 0usize);
    let mut below = [0.0f64; 3];
    let mut above = [0.0f64; 3];
    samples.for_each_above(threshold, |ijk, _| {
        let g = geometry::apply(&m, ijk.map(|x| x as f64));
        let mut out = false;
        for a in 0..3 {
            // The grid covers voxel centres 0..n-1 plus half a voxel either side.
            let lo = -0.5 - g[a];
            let hi = g[a] - (grid[a] as f64 - 0.5);
            if lo > 0.0 {
                below[a] = below[a].max(lo * spacing[a]);
                out = true;
            }
            if hi > 0.0 {
                above[a] = above[a].max(hi * spacing[a]);
                out = true;
            }
        }
        if out {
            outside += 1;
        } else {
            inside += 1;
        }
    });
    let total = inside + outside;
    Cropping {
        fraction_outside: if total > 0 {
            outside as f64 / total as f64
        } else {
            0.0
        },
        below_mm: below,
        above_mm: above,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_interpolation() {
        let mut v: Vec<f32> = (0..=10).map(|x| x as f32).collect();
        v.reverse();
        assert_eq!(percentile(&mut v, 0.5), Some(5.0));
        assert!((percentile(&mut v, 0.25).unwrap_or(f32::NAN) - 2.5).abs() < 1e-6);
        assert!((percentile(&mut v, 0.995).unwrap_or(f32::NAN) - 9.95).abs() < 1e-5);
        assert_eq!(percentile(&mut [], 0.5), None);
    }

    #[test]
    fn exact_percentiles_agree_with_selection() {
        let v: Vec<f32> = (0..100_003)
            .map(|i| (((i * 7919) % 100_003) as f32).sqrt())
            .collect();
        for qs in [[0.005, 0.995], [0.0, 1.0], [0.5, 0.25]] {
            let got = exact_percentiles(&v, qs).unwrap_or([f32::NAN; 2]);
            for (g, q) in got.iter().zip(qs) {
                let want = percentile(&mut v.clone(), q).unwrap_or(f32::NAN);
                assert!(
                    (g - want).abs() <= 1e-4 * want.abs(),
                    "q {q}: {g} vs {want}"
                );
            }
        }
        assert_eq!(exact_percentiles(&[3.0, 3.0], [0.1, 0.9]), Some([3.0, 3.0]));
    }

    #[test]
    fn histogram_percentiles_are_close_to_exact_ones() {
        let v: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 10_000) as f32).collect();
        let [a, b] = approx_percentiles(&v, [0.02, 0.98]);
        assert!(
            (a - 200.0).abs() < 5.0 && (b - 9798.0).abs() < 5.0,
            "{a} {b}"
        );
    }

    #[test]
    fn an_object_smaller_than_two_percent_is_still_found() {
        let dims = [40, 30, 20];
        let mut data = vec![0.0f32; 40 * 30 * 20];
        for k in 9..12 {
            for j in 12..15 {
                for i in 21..24 {
                    data[(k * 30 + j) * 40 + i] = 50.0;
                }
            }
        }
        let samples = Samples::take(&SourceVolume::F32 { data: &data, dims });
        let fg = find(&samples, &geometry::IDENTITY);
        assert!(fg.sampled_count > 0 && fg.threshold < 50.0, "{fg:?}");
        assert!((fg.centre_world[0] - 22.0).abs() <= 1.5, "{fg:?}");
    }

    #[test]
    fn centre_of_a_cube_is_found_in_world_coordinates() {
        let dims = [40, 30, 20];
        let mut data = vec![0.0f32; 40 * 30 * 20];
        for k in 4..12 {
            for j in 10..20 {
                for i in 20..30 {
                    data[(k * 30 + j) * 40 + i] = 100.0;
                }
            }
        }
        let mut affine = geometry::IDENTITY;
        affine[0][3] = -10.0;
        let samples = Samples::take(&SourceVolume::F32 { data: &data, dims });
        let fg = find(&samples, &affine);
        assert!(fg.threshold > 0.0 && fg.threshold < 100.0);
        // Sampling every second voxel: cube [20,30) sampled at 20..28 -> centre 24.
        assert!(
            (fg.centre_world[0] - 14.0).abs() <= 1.0,
            "{:?}",
            fg.centre_world
        );
        assert!((fg.centre_world[1] - 14.5).abs() <= 1.0);
        assert!((fg.centre_world[2] - 7.5).abs() <= 1.0);
    }
}
