//! One resampling pass from the source voxels onto the grid through the full grid -> source
//! matrix. Intensities: the area average of the trilinear interpolant over the grid voxel's
//! footprint (a box pre-filter of width spacing / source voxel size, then trilinear), which is
//! plain trilinear when not downsampling. Labels: the most severe label in the footprint.
use super::source::SourceVolume;
use crate::data::geometry::Mat4;
use rayon::prelude::*;

/// Box filter of width `w` source voxels on the voxel grid, as (offset, weight) with
/// fractional edge weights, summing to 1. Width <= 1 is no filter (trilinear only).
pub fn box_taps(w: f64) -> Vec<(i64, f64)> {
    if w <= 1.0 + 1e-6 {
        return vec![(0, 1.0)];
    }
    let half = w / 2.0;
    let r = (half - 0.5).ceil() as i64;
    (-r..=r)
        .filter_map(|d| {
            let d_f = d as f64;
            let overlap = (d_f + 0.5).min(half) - (d_f - 0.5).max(-half);
            (overlap > 0.0).then_some((d, overlap / w))
        })
        .collect()
}

/// Per output index along one axis: which source indices contribute and how much.
#[derive(Clone, Debug)]
pub struct AxisWeights {
    pub start: Vec<usize>,
    pub len: Vec<usize>,
    /// `taps` weights per output index (only the first `len` are used).
    pub w: Vec<f32>,
    pub taps: usize,
}

impl AxisWeights {
    /// Output index `o` sits at source coordinate `m * o + t`; `width` is the box pre-filter
    /// width in source voxels. Source indices outside 0..n_src contribute nothing (zero
    /// outside the field of view).
    pub fn new(m: f64, t: f64, n_out: usize, n_src: usize, width: f64) -> Self {
        let taps_box = box_taps(width);
        let r = taps_box.iter().map(|&(d, _)| d.abs()).max().unwrap_or(0);
        let taps = (2 * r + 2) as usize;
        let mut start = Vec::with_capacity(n_out);
        let mut len = Vec::with_capacity(n_out);
        let mut w = vec![0.0f32; n_out * taps];
        let mut local = vec![0.0f64; taps];
        for o in 0..n_out {
            let p = m * o as f64 + t;
            let base = p.floor() as i64 - r;
            local.iter_mut().for_each(|x| *x = 0.0);
            for &(d, bw) in &taps_box {
                let q = p + d as f64;
                let f0 = q.floor();
                let frac = q - f0;
                let k = (f0 as i64 - base) as usize;
                local[k] += bw * (1.0 - frac);
                if k + 1 < taps {
                    local[k + 1] += bw * frac;
                }
            }
            let lo = base.max(0);
            let hi = (base + taps as i64).min(n_src as i64);
            if hi <= lo {
                start.push(0);
                len.push(0);
                continue;
            }
            start.push(lo as usize);
            len.push((hi - lo) as usize);
            for (x, src) in (lo..hi).enumerate() {
                w[o * taps + x] = local[(src - base) as usize] as f32;
            }
        }
        Self {
            start,
            len,
            w,
            taps,
        }
    }

    fn weights(&self, o: usize) -> &[f32] {
        &self.w[o * self.taps..o * self.taps + self.len[o]]
    }

    /// Source index range touched by any output index (empty when none).
    fn range(&self) -> (usize, usize) {
        let mut lo = usize::MAX;
        let mut hi = 0;
        for (s, l) in self.start.iter().zip(&self.len) {
            if *l > 0 {
                lo = lo.min(*s);
                hi = hi.max(s + l);
            }
        }
        if lo == usize::MAX { (0, 0) } else { (lo, hi) }
    }
}

/// For a grid -> source matrix whose 3x3 block is a scaled permutation (no rotation), the
/// source axis of each grid axis; None for oblique matrices.
pub fn axis_permutation(m: &Mat4) -> Option<[usize; 3]> {
    let mut perm = [usize::MAX; 3];
    for a in 0..3 {
        let norm = (0..3).map(|s| m[s][a] * m[s][a]).sum::<f64>().sqrt();
        let big: Vec<usize> = (0..3).filter(|&s| m[s][a].abs() > 1e-9 * norm).collect();
        if big.len() != 1 || perm.contains(&big[0]) {
            return None;
        }
        perm[a] = big[0];
    }
    Some(perm)
}

/// Box pre-filter widths per source axis: the grid spacing in source voxels.
pub fn filter_widths(spacing: f64, source_voxel_sizes: [f64; 3]) -> [f64; 3] {
    source_voxel_sizes.map(|v| spacing / v)
}

/// Resamples intensities onto `grid` ([X][Y][Z], z fastest).
pub fn resample_intensity(
    src: &SourceVolume,
    grid_to_source: &Mat4,
    grid: [usize; 3],
    widths: [f64; 3],
) -> Vec<f32> {
    match axis_permutation(grid_to_source) {
        Some(perm) => resample_separable(src, grid_to_source, grid, widths, perm),
        None => resample_general(&src.to_vec(), src.dims(), grid_to_source, grid, widths),
    }
}

#[inline]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    out.iter_mut().zip(x).for_each(|(o, v)| *o += w * v);
}

/// Axis-aligned case: three 1-D passes with precomputed weights, then one transpose into the
/// grid layout. Each grid plane along source axis 2 is made on its own (in parallel), through
/// scratch planes small enough to stay in cache: the weighted sum of the few source planes it
/// covers (whole contiguous rows, converted from the file's bytes as they are read, only the
/// rows the grid needs), then the pass along source axis 1 (rows again), then the pass along
/// source axis 0 on the transposed reduced plane (rows again: everything vectorises).
pub fn resample_separable(
    src: &SourceVolume,
    m: &Mat4,
    grid: [usize; 3],
    widths: [f64; 3],
    perm: [usize; 3],
) -> Vec<f32> {
    let dims = src.dims();
    let mut inv = [0usize; 3];
    for (a, &s) in perm.iter().enumerate() {
        inv[s] = a;
    }
    // Weights per source axis s, indexed by the grid axis inv[s].
    let wts: Vec<AxisWeights> = (0..3)
        .map(|s| {
            let a = inv[s];
            AxisWeights::new(m[s][a], m[s][3], grid[a], dims[s], widths[s])
        })
        .collect();
    let g = [grid[inv[0]], grid[inv[1]], grid[inv[2]]];
    let (r0lo, r0hi) = wts[0].range();
    let (r1lo, r1hi) = wts[1].range();
    let (n0, n1) = (r0hi - r0lo, r1hi - r1lo);
    let mut out = vec![0.0f32; grid[0] * grid[1] * grid[2]];
    if n0 == 0 || n1 == 0 {
        return out;
    }

    let plane = g[1] * g[0];
    let mut c = vec![0.0f32; g[2] * plane];
    c.par_chunks_mut(plane).enumerate().for_each_init(
        || {
            (
                vec![0.0f32; n1 * n0],
                vec![0.0f32; g[1] * n0],
                vec![0.0f32; n0 * g[1]],
            )
        },
        |(p, q, qt), (o2, dst)| {
            let taps = wts[2].weights(o2);
            if taps.is_empty() {
                return;
            }
            // Along source axis 2: p[i1][i0].
            p.iter_mut().for_each(|v| *v = 0.0);
            for (t, &w) in taps.iter().enumerate() {
                let k = wts[2].start[o2] + t;
                for c1 in 0..n1 {
                    src.axpy_row(w, r0lo, r1lo + c1, k, &mut p[c1 * n0..][..n0]);
                }
            }
            // Along source axis 1: q[o1][i0].
            q.iter_mut().for_each(|v| *v = 0.0);
            for o1 in 0..g[1] {
                let qrow = &mut q[o1 * n0..][..n0];
                for (t, &w) in wts[1].weights(o1).iter().enumerate() {
                    let c1 = wts[1].start[o1] + t - r1lo;
                    axpy(qrow, w, &p[c1 * n0..][..n0]);
                }
            }
            // Along source axis 0, on the transposed plane so that this pass is whole-row
            // arithmetic too: dst[o0][o1].
            for (o1, qrow) in q.chunks_exact(n0).enumerate() {
                for (i0, &v) in qrow.iter().enumerate() {
                    qt[i0 * g[1] + o1] = v;
                }
            }
            dst.iter_mut().for_each(|v| *v = 0.0);
            for (o0, drow) in dst.chunks_exact_mut(g[1]).enumerate() {
                for (t, &w) in wts[0].weights(o0).iter().enumerate() {
                    let i0 = wts[0].start[o0] + t - r0lo;
                    axpy(drow, w, &qt[i0 * g[1]..][..g[1]]);
                }
            }
        },
    );

    let out_strides = [grid[1] * grid[2], grid[2], 1];
    let st = [
        out_strides[inv[0]],
        out_strides[inv[1]],
        out_strides[inv[2]],
    ];
    let mut idx = 0;
    for o2 in 0..g[2] {
        for o0 in 0..g[0] {
            let base = o2 * st[2] + o0 * st[0];
            for o1 in 0..g[1] {
                out[base + o1 * st[1]] = c[idx];
                idx += 1;
            }
        }
    }
    out
}

/// Oblique case: box pre-filter on the source (separable, along the source axes), then a
/// trilinear sample at each grid voxel's source position.
pub fn resample_general(
    src: &[f32],
    dims: [usize; 3],
    m: &Mat4,
    grid: [usize; 3],
    widths: [f64; 3],
) -> Vec<f32> {
    let filtered = prefilter(src, dims, widths);
    let vol = filtered.as_deref().unwrap_or(src);
    from_source_positions(grid, m, |p| trilinear(vol, dims, p))
}

/// A grid volume (z fastest) whose voxel g is `value(m * g)`, the source position of g;
/// parallel over x slabs.
fn from_source_positions<T: Copy + Default + Send>(
    grid: [usize; 3],
    m: &Mat4,
    value: impl Fn([f64; 3]) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); grid[0] * grid[1] * grid[2]];
    out.par_chunks_mut(grid[1] * grid[2])
        .enumerate()
        .for_each(|(x, slab)| {
            for y in 0..grid[1] {
                for z in 0..grid[2] {
                    let g = [x as f64, y as f64, z as f64];
                    let p: [f64; 3] = [0, 1, 2]
                        .map(|r| m[r][0] * g[0] + m[r][1] * g[1] + m[r][2] * g[2] + m[r][3]);
                    slab[y * grid[2] + z] = value(p);
                }
            }
        });
    out
}

/// Trilinear interpolation, zero outside the volume.
#[inline]
pub fn trilinear(vol: &[f32], dims: [usize; 3], p: [f64; 3]) -> f32 {
    let f = p.map(f64::floor);
    if f[0] < -1.0
        || f[1] < -1.0
        || f[2] < -1.0
        || f[0] >= dims[0] as f64
        || f[1] >= dims[1] as f64
        || f[2] >= dims[2] as f64
    {
        return 0.0;
    }
    let base = f.map(|v| v as i64);
    let fr = [0, 1, 2].map(|a| (p[a] - f[a]) as f32);
    let mut acc = 0.0f32;
    for dz in 0..2i64 {
        let k = base[2] + dz;
        if k < 0 || k >= dims[2] as i64 {
            continue;
        }
        let wz = if dz == 0 { 1.0 - fr[2] } else { fr[2] };
        for dy in 0..2i64 {
            let j = base[1] + dy;
            if j < 0 || j >= dims[1] as i64 {
                continue;
            }
            let wy = if dy == 0 { 1.0 - fr[1] } else { fr[1] };
            let row = (k as usize * dims[1] + j as usize) * dims[0];
            for dx in 0..2i64 {
                let i = base[0] + dx;
                if i < 0 || i >= dims[0] as i64 {
                    continue;
                }
                let wx = if dx == 0 { 1.0 - fr[0] } else { fr[0] };
                acc += wz * wy * wx * vol[row + i as usize];
            }
        }
    }
    acc
}

/// Separable box filter along each source axis whose width exceeds one voxel (zero outside);
/// None when no axis needs it.
fn prefilter(src: &[f32], dims: [usize; 3], widths: [f64; 3]) -> Option<Vec<f32>> {
    let taps: Vec<Vec<(i64, f64)>> = widths.iter().map(|&w| box_taps(w)).collect();
    if taps.iter().all(|t| t.len() == 1) {
        return None;
    }
    let mut cur = src.to_vec();
    let strides = [1usize, dims[0], dims[0] * dims[1]];
    for a in 0..3 {
        if taps[a].len() == 1 {
            continue;
        }
        let prev = cur.clone();
        let n = dims[a] as i64;
        let st = strides[a];
        cur.par_chunks_mut(dims[0] * dims[1])
            .enumerate()
            .for_each(|(k, plane)| {
                for (local, v) in plane.iter_mut().enumerate() {
                    let idx = k * dims[0] * dims[1] + local;
                    let coord = [local % dims[0], local / dims[0], k][a] as i64;
                    let mut acc = 0.0f64;
                    for &(d, w) in &taps[a] {
                        let c = coord + d;
                        if c >= 0 && c < n {
                            let j = (idx as i64 + d * st as i64) as usize;
                            acc += w * f64::from(prev[j]);
                        }
                    }
                    *v = acc as f32;
                }
            });
    }
    Some(cur)
}

/// BraTS severity: enhancing (4) > necrotic core (1) > oedema (2) > any other label (by value)
/// > background (0).
#[inline]
fn severity(label: u8) -> u16 {
    match label {
        0 => 0,
        4 => 300,
        1 => 299,
        2 => 298,
        v => u16::from(v),
    }
}

/// Resamples a label map: each grid voxel takes the most severe label among the source voxels
/// its footprint covers (nearest-voxel look-ups on a sub-grid dense enough to hit every source
/// voxel), so a one-voxel lesion survives any downsampling. Plain nearest when not
/// downsampling.
/// Inclusive bounding box (source voxel indices) of the non-zero labels, None when all are 0.
fn nonzero_box(labels: &[u8], dims: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for (k, plane) in labels.chunks_exact(dims[0] * dims[1]).enumerate() {
        for (j, row) in plane.chunks_exact(dims[0]).enumerate() {
            if let (Some(first), Some(last)) = (
                row.iter().position(|&l| l != 0),
                row.iter().rposition(|&l| l != 0),
            ) {
                for (a, v) in [(0, first), (1, j), (2, k)] {
                    lo[a] = lo[a].min(v);
                }
                for (a, v) in [(0, last), (1, j), (2, k)] {
                    hi[a] = hi[a].max(v);
                }
            }
        }
    }
    (lo[0] != usize::MAX).then_some((lo, hi))
}

pub fn resample_labels(labels: &[u8], dims: [usize; 3], m: &Mat4, grid: [usize; 3]) -> Vec<u8> {
    let sub: [usize; 3] = [0, 1, 2].map(|a| {
        let extent = (0..3).map(|s| m[s][a].abs()).fold(0.0f64, f64::max);
        if extent > 1.0 + 1e-6 {
            extent.ceil() as usize + 1
        } else {
            1
        }
    });
    let offsets: Vec<[f64; 3]> = {
        let mut v = Vec::new();
        let off = |n: usize, t: usize| (t as f64 + 0.5) / n as f64 - 0.5;
        for a in 0..sub[0] {
            for b in 0..sub[1] {
                for c in 0..sub[2] {
                    let u = [off(sub[0], a), off(sub[1], b), off(sub[2], c)];
                    v.push([0, 1, 2].map(|r| m[r][0] * u[0] + m[r][1] * u[1] + m[r][2] * u[2]));
                }
            }
        }
        v
    };
    // Lesions are small: grid voxels whose footprint misses the box around every non-zero
    // source label are background without looking (this made tumour subjects 6x slower).
    let Some((lo, hi)) = nonzero_box(labels, dims) else {
        return vec![0; grid[0] * grid[1] * grid[2]];
    };
    let reach = offsets
        .iter()
        .flat_map(|o| o.iter().map(|v| v.abs()))
        .fold(0.0f64, f64::max)
        + 1.0;
    from_source_positions(grid, m, |p| {
        if (0..3).any(|a| p[a] < lo[a] as f64 - reach || p[a] > hi[a] as f64 + reach) {
            return 0;
        }
        let mut best = 0u8;
        for off in &offsets {
            let q = [p[0] + off[0], p[1] + off[1], p[2] + off[2]].map(f64::round);
            if (0..3).any(|a| q[a] < 0.0 || q[a] >= dims[a] as f64) {
                continue;
            }
            let l = labels[(q[2] as usize * dims[1] + q[1] as usize) * dims[0] + q[0] as usize];
            if severity(l) > severity(best) {
                best = l;
            }
        }
        best
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::geometry;

    #[test]
    fn box_taps_sum_to_one_with_fractional_edges() {
        let t = box_taps(2.0);
        assert_eq!(t, vec![(-1, 0.25), (0, 0.5), (1, 0.25)]);
        let t = box_taps(1.5);
        let sum: f64 = t.iter().map(|x| x.1).sum();
        assert!((sum - 1.0).abs() < 1e-12);
        assert_eq!(box_taps(0.8), vec![(0, 1.0)]);
    }

    fn ramp_volume(dims: [usize; 3]) -> Vec<f32> {
        let mut v = Vec::new();
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    v.push(((i * 7 + j * 3 + k * 5) % 17) as f32 + (i as f32) * 0.5);
                }
            }
        }
        v
    }

    /// The separable fast path and the general path compute the same thing.
    #[test]
    fn separable_path_matches_general_path_on_a_flipped_permutation() {
        let dims = [23, 19, 17];
        let src = ramp_volume(dims);
        // Grid axes: x <- -source z, y <- source x (scaled), z <- source y.
        let m: Mat4 = [
            [0.0, 1.6, 0.0, 2.3],
            [0.0, 0.0, 1.4, 2.3],
            [-2.0, 0.0, 0.0, 14.2],
            [0.0, 0.0, 0.0, 1.0],
        ];
        // Every sample stays two voxels inside, where the two paths' edge handling cannot differ.
        let grid = [6, 12, 10];
        let widths = [1.6, 1.4, 2.0];
        let perm = axis_permutation(&m).expect("aligned");
        assert_eq!(perm, [2, 0, 1]);
        let a = resample_separable(
            &SourceVolume::F32 { data: &src, dims },
            &m,
            grid,
            widths,
            perm,
        );
        let b = resample_general(&src, dims, &m, grid, widths);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() < 1e-3, "voxel {i}: separable {x} general {y}");
        }
        assert!(axis_permutation(&geometry::IDENTITY).is_some());
    }

    #[test]
    fn one_voxel_label_survives_threefold_downsampling() {
        let dims = [30, 30, 30];
        let mut labels = vec![0u8; 27000];
        labels[(14 * 30 + 13) * 30 + 16] = 4;
        labels[(14 * 30 + 14) * 30 + 14] = 2;
        let mut m = geometry::IDENTITY;
        for (a, row) in m.iter_mut().take(3).enumerate() {
            row[a] = 3.0;
            row[3] = 1.0;
        }
        let out = resample_labels(&labels, dims, &m, [10, 10, 10]);
        let count = |l: u8| out.iter().filter(|&&v| v == l).count();
        assert_eq!(count(4), 1);
        assert_eq!(count(2), 1);
        assert_eq!(count(0), 998);
    }
}
