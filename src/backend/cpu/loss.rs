//! The losses with their input gradients: MSE for masked encoding vector prediction, the
//! triplet margin loss (PyTorch's `triplet_margin_loss` with its pairwise-distance epsilon),
//! and the segmentation loss (softmax cross-entropy plus soft Dice). Sums run in f64 in a
//! fixed order, so the loss is deterministic.
use super::Real;
use crate::backend::DiceCe;
use rayon::prelude::*;

/// PyTorch's `pairwise_distance` epsilon: `||x - y + eps||` is never 0, so `x == y` gives a
/// finite gradient instead of 0/0.
pub(crate) const PAIRWISE_EPS: f32 = 1e-6;

/// `mean((pred - target)^2)`; writes `dpred = 2 (pred - target) / len * scale`.
pub fn mse<T: Real>(scale: f32, pred: &[T], target: &[T], dpred: &mut [T]) -> T {
    let len = pred.len();
    assert!(
        target.len() == len && dpred.len() == len,
        "mse: lengths {len}, {}, {}",
        target.len(),
        dpred.len()
    );
    if len == 0 {
        return T::zero();
    }
    let g = T::of(scale) * T::of(2.0) / T::from_usize(len).unwrap_or_else(T::nan);
    let mut sum = 0f64;
    for ((d, &p), &t) in dpred.iter_mut().zip(pred).zip(target) {
        let diff = p - t;
        sum += diff.to_f64().unwrap_or(f64::NAN).powi(2);
        *d = diff * g;
    }
    T::from_f64(sum / len as f64).unwrap_or_else(T::nan)
}

/// Mean over `rows` of `max(0, ||a - p + eps|| - ||a - n + eps|| + margin)`; writes
/// `da, dp, dn` (times `scale`). Rows where the hinge is inactive get zero gradient.
pub fn triplet<T: Real>(
    rows: usize,
    d: usize,
    margin: f32,
    scale: f32,
    a: &[T],
    p: &[T],
    n: &[T],
    da: &mut [T],
    dp: &mut [T],
    dn: &mut [T],
) -> T {
    let len = rows * d;
    for x in [a, p, n, &*da, &*dp, &*dn] {
        assert!(
            x.len() >= len,
            "triplet: a buffer is shorter than {rows} x {d}"
        );
    }
    if rows == 0 {
        return T::zero();
    }
    let (eps, margin) = (T::of(PAIRWISE_EPS), T::of(margin));
    let g = T::of(scale) / T::from_usize(rows).unwrap_or_else(T::nan);
    let mut sum = 0f64;
    for r in 0..rows {
        let span = r * d..(r + 1) * d;
        let (ar, pr, nr) = (&a[span.clone()], &p[span.clone()], &n[span.clone()]);
        let dist = |y: &[T]| {
            ar.iter()
                .zip(y)
                .map(|(&x, &y)| (x - y + eps).powi(2))
                .sum::<T>()
                .sqrt()
        };
        let (d_ap, d_an) = (dist(pr), dist(nr));
        let hinge = d_ap - d_an + margin;
        let (da_r, dp_r, dn_r) = (&mut da[span.clone()], &mut dp[span.clone()], &mut dn[span]);
        if hinge > T::zero() {
            sum += hinge.to_f64().unwrap_or(f64::NAN);
            // d||u||/du = u / ||u||, with u = a - p + eps and w = a - n + eps.
            for j in 0..d {
                let u = (ar[j] - pr[j] + eps) / d_ap;
                let w = (ar[j] - nr[j] + eps) / d_an;
                da_r[j] = (u - w) * g;
                dp_r[j] = -u * g;
                dn_r[j] = w * g;
            }
        } else {
            da_r.fill(T::zero());
            dp_r.fill(T::zero());
            dn_r.fill(T::zero());
        }
    }
    T::from_f64(sum / rows as f64).unwrap_or_else(T::nan)
}

/// The segmentation loss of [`crate::backend::Backend::dice_ce`]: one rayon task per subject,
/// each summing its pixels in order, so the result does not depend on the thread count.
pub fn dice_ce<T: Real>(s: &DiceCe, logits: &[T], labels: &[u8], dlogits: &mut [T]) -> f64 {
    let pixels = s.slices * s.hw;
    assert!(
        logits.len() == s.len() && dlogits.len() == s.len() && labels.len() == s.subjects * pixels,
        "dice_ce: {} logits, {} gradients, {} labels for {s:?}",
        logits.len(),
        dlogits.len(),
        labels.len()
    );
    assert!(s.classes >= 2, "dice_ce: {} classes", s.classes);
    if s.is_empty() {
        return 0.0;
    }
    let per = s.slices * s.classes * s.hw;
    let losses: Vec<f64> = logits
        .par_chunks(per)
        .zip(labels.par_chunks(pixels))
        .zip(dlogits.par_chunks_mut(per))
        .map(|((z, y), dz)| dice_ce_subject(s, z, y, dz))
        .collect();
    losses.iter().sum::<f64>() / s.subjects as f64
}

/// One subject: returns `CE + 1 - mean Dice` (the Dice averaged over [`DiceCe::regions`])
/// and writes its gradient divided by the number of subjects (the batch mean). `dz` first
/// holds the softmax probabilities.
fn dice_ce_subject<T: Real>(s: &DiceCe, z: &[T], y: &[u8], dz: &mut [T]) -> f64 {
    let (classes, hw) = (s.classes, s.hw);
    let at = |k: usize, c: usize, q: usize| (k * classes + c) * hw + q;
    let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
    let t = |v: f64| T::from_f64(v).unwrap_or_else(T::nan);
    let regions = s.regions.len();
    let member = |r: usize, c: usize| s.regions[r] >> c & 1 == 1;
    // Pass 1: probabilities, cross-entropy and each region's Dice sums.
    let (mut ce, mut inter, mut psum, mut gsum) = (
        0.0,
        vec![0.0; regions],
        vec![0.0; regions],
        vec![0.0; regions],
    );
    let mut e = vec![0.0; classes];
    for k in 0..s.slices {
        for q in 0..hw {
            let label = usize::from(y[k * hw + q]);
            assert!(label < classes, "dice_ce: class {label} of {classes}");
            let max = (0..classes)
                .map(|c| f(z[at(k, c, q)]))
                .fold(f64::MIN, f64::max);
            let mut sum = 0.0;
            for c in 0..classes {
                e[c] = (f(z[at(k, c, q)]) - max).exp();
                sum += e[c];
            }
            // -log p_label = logsumexp(z) - z_label, finite for any logits.
            let weight = if label == 0 { 1.0 } else { s.fg_weight };
            ce += weight * (max + sum.ln() - f(z[at(k, label, q)]));
            for c in 0..classes {
                e[c] /= sum;
                dz[at(k, c, q)] = t(e[c]);
            }
            for r in 0..regions {
                let p: f64 = (0..classes).filter(|&c| member(r, c)).map(|c| e[c]).sum();
                psum[r] += p;
                if member(r, label) {
                    inter[r] += p;
                    gsum[r] += 1.0;
                }
            }
        }
    }
    let pixels = (s.slices * hw) as f64;
    let n_regions = regions.max(1) as f64;
    // dLoss/dp_R = alpha_R [label in R] + beta_R for region R, with U = P + G + eps:
    // d(1 - mean Dice)/dp_R = -(2 g / U - (2 I + eps) / U^2) / regions; a class's
    // probability feeds every region that holds it, dLoss/dp_c = sum over those regions.
    let (mut alpha, mut beta) = (vec![0.0; regions], vec![0.0; regions]);
    let mut dice = 0.0;
    for r in 0..regions {
        let u = psum[r] + gsum[r] + s.eps;
        let num = 2.0 * inter[r] + s.eps;
        dice += num / u / n_regions;
        alpha[r] = -2.0 / (u * n_regions);
        beta[r] = num / (u * u * n_regions);
    }
    // Pass 2: through the softmax, dz_c = p_c (a_c - sum_c' p_c' a_c') for the Dice part,
    // w_label (p_c - [c = label]) / pixels for the cross-entropy; both over the batch's
    // subjects.
    let scale = 1.0 / s.subjects as f64;
    let mut a = vec![0.0; classes];
    for k in 0..s.slices {
        for q in 0..hw {
            let label = usize::from(y[k * hw + q]);
            let weight = if label == 0 { 1.0 } else { s.fg_weight };
            let mut mean = 0.0;
            for c in 0..classes {
                a[c] = (0..regions)
                    .filter(|&r| member(r, c))
                    .map(|r| beta[r] + if member(r, label) { alpha[r] } else { 0.0 })
                    .sum();
                mean += f(dz[at(k, c, q)]) * a[c];
            }
            for c in 0..classes {
                let p = f(dz[at(k, c, q)]);
                let hit = if c == label { 1.0 } else { 0.0 };
                dz[at(k, c, q)] = t(scale * (p * (a[c] - mean) + weight * (p - hit) / pixels));
            }
        }
    }
    ce / pixels + 1.0 - dice
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, random};

    #[test]
    fn mse_value_and_gradient() {
        let (mut pred, target) = (random(37, 1), random(37, 2));
        let mut dpred = vec![f64::NAN; 37];
        let loss = mse(0.5, &pred, &target, &mut dpred);
        let want: f64 = pred
            .iter()
            .zip(&target)
            .map(|(p, t)| (p - t).powi(2))
            .sum::<f64>()
            / 37.0;
        assert!((loss - want).abs() < 1e-15);
        // With scale 0.5 the gradient is that of 0.5 * loss.
        let mut scratch = vec![0.0; 37];
        check("mse dpred", &mut pred, &dpred, 100, 1e-7, |x| {
            0.5 * mse(1.0, x, &target, &mut scratch)
        });
    }

    #[test]
    fn mse_f32_agrees_with_f64() {
        let (pred, target) = (random(576, 7), random(576, 8));
        let mut d64 = vec![0.0; 576];
        let l64 = mse(0.25, &pred, &target, &mut d64);
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let mut d32 = vec![0.0f32; 576];
        let l32 = mse(0.25, &f(&pred), &f(&target), &mut d32);
        assert!((l32 as f64 - l64).abs() < 1e-6 * l64);
        assert!(
            d32.iter()
                .zip(&d64)
                .all(|(x, y)| (*x as f64 - y).abs() < 1e-8)
        );
    }

    /// Rows 0-3 random (margin 0.3 leaves some active, some not), row 4 with `n` far away
    /// (inactive), row 5 with `a == p` exactly when `same` (an all-background slice).
    fn triplet_inputs(rows: usize, d: usize, same: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let a = random(rows * d, 3);
        let mut p = random(rows * d, 4);
        let mut n = random(rows * d, 5);
        n[4 * d..5 * d].iter_mut().for_each(|x| *x += 10.0);
        if same {
            p[5 * d..6 * d].copy_from_slice(&a[5 * d..6 * d]);
        }
        (a, p, n)
    }

    #[test]
    fn triplet_gradients_match_finite_differences() {
        let (rows, d, margin, scale) = (6, 5, 0.3, 2.0);
        let (mut a, mut p, mut n) = triplet_inputs(rows, d, false);
        let (mut da, mut dp, mut dn) = (vec![f64::NAN; 30], vec![f64::NAN; 30], vec![f64::NAN; 30]);
        let loss = triplet(
            rows, d, margin, scale, &a, &p, &n, &mut da, &mut dp, &mut dn,
        );
        assert!(loss.is_finite() && loss > 0.0);
        assert!(da[20..25].iter().chain(&dn[20..25]).all(|&g| g == 0.0));
        let active: usize = (0..rows).filter(|r| dn[r * d] != 0.0).count();
        assert!(
            active >= 2 && active < rows,
            "want active and inactive rows: {active}"
        );
        let mut s = vec![vec![0.0; 30]; 3];
        let mut f = |a: &[f64], p: &[f64], n: &[f64]| {
            let [s1, s2, s3] = &mut s[..] else {
                unreachable!()
            };
            scale as f64 * triplet(rows, d, margin, 1.0, a, p, n, s1, s2, s3)
        };
        let (a0, p0, n0) = (a.clone(), p.clone(), n.clone());
        check("triplet da", &mut a, &da, 100, 1e-6, |x| f(x, &p0, &n0));
        check("triplet dp", &mut p, &dp, 100, 1e-6, |x| f(&a0, x, &n0));
        check("triplet dn", &mut n, &dn, 100, 1e-6, |x| f(&a0, &p0, x));
    }

    #[test]
    fn triplet_with_identical_anchor_and_positive_is_finite() {
        // ||a - p + eps|| = eps sqrt(d) when a == p, so its gradient is -eps / (eps sqrt(d))
        // per coordinate (times scale / rows): finite, where a plain norm would give 0/0.
        // (Finite differences are useless here: the step would dwarf eps.) Margin 10 keeps
        // every hinge active.
        let (rows, d, scale) = (6, 5, 2.0);
        let (a, p, n) = triplet_inputs(rows, d, true);
        let (mut da, mut dp, mut dn) = (vec![f64::NAN; 30], vec![f64::NAN; 30], vec![f64::NAN; 30]);
        let loss = triplet(rows, d, 10.0, scale, &a, &p, &n, &mut da, &mut dp, &mut dn);
        assert!(loss.is_finite());
        assert!(da.iter().chain(&dp).chain(&dn).all(|g| g.is_finite()));
        let want = -(scale as f64) / rows as f64 / (d as f64).sqrt();
        for &g in &dp[25..30] {
            assert!((g - want).abs() < 1e-12, "{g} vs {want}");
        }
    }

    #[test]
    fn triplet_f32_agrees_with_f64() {
        let (rows, d) = (6, 5);
        let (a, p, n) = triplet_inputs(rows, d, true);
        let mut g64 = vec![vec![0.0; 30]; 3];
        let [da, dp, dn] = &mut g64[..] else {
            unreachable!()
        };
        let l64 = triplet(rows, d, 0.3, 1.0, &a, &p, &n, da, dp, dn);
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let mut g32 = vec![vec![0.0f32; 30]; 3];
        let [da, dp, dn] = &mut g32[..] else {
            unreachable!()
        };
        let l32 = triplet(rows, d, 0.3, 1.0, &f(&a), &f(&p), &f(&n), da, dp, dn);
        assert!((l32 as f64 - l64).abs() < 1e-6);
        // Row 5 (a == p) agrees too: a - p is exactly 0 in both precisions.
        for (x, y) in g32.iter().flatten().zip(g64.iter().flatten()) {
            assert!((*x as f64 - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    /// Three subjects of 2 slices of 3 x 4 pixels, 4 classes: the first with every class, the
    /// second with background only (its tumour Dice terms are eps / (P + eps): they push the
    /// tumour probabilities down), the third with one tumour class missing.
    fn dice_inputs() -> (DiceCe, Vec<f64>, Vec<u8>) {
        let s = DiceCe {
            subjects: 3,
            slices: 2,
            classes: 4,
            hw: 12,
            eps: 1.0,
            fg_weight: 1.0,
            regions: &[1 << 1, 1 << 2, 1 << 3],
        };
        let logits: Vec<f64> = random(s.len(), 21).iter().map(|v| 3.0 * v).collect();
        let labels: Vec<u8> = (0..s.subjects * s.slices * s.hw)
            .map(|i| match i / (s.slices * s.hw) {
                0 => (i % 4) as u8,
                1 => 0,
                _ => [0, 1, 3][i % 3],
            })
            .collect();
        (s, logits, labels)
    }

    /// The loss written out directly from its definition.
    fn dice_ce_direct(s: &DiceCe, z: &[f64], y: &[u8]) -> f64 {
        let regions = s.regions.len();
        let mut total = 0.0;
        for b in 0..s.subjects {
            let mut ce = 0.0;
            let (mut inter, mut psum, mut gsum) =
                (vec![0.0; regions], vec![0.0; regions], vec![0.0; regions]);
            for k in 0..s.slices {
                for q in 0..s.hw {
                    let row = b * s.slices + k;
                    let zs: Vec<f64> = (0..4).map(|c| z[(row * 4 + c) * s.hw + q]).collect();
                    let norm: f64 = zs.iter().map(|v| v.exp()).sum();
                    let label = y[row * s.hw + q] as usize;
                    let w = if label == 0 { 1.0 } else { s.fg_weight };
                    ce -= w * (zs[label].exp() / norm).ln();
                    for (r, &mask) in s.regions.iter().enumerate() {
                        let p: f64 = (0..4)
                            .filter(|&c| mask >> c & 1 == 1)
                            .map(|c| zs[c].exp() / norm)
                            .sum();
                        psum[r] += p;
                        if mask >> label & 1 == 1 {
                            inter[r] += p;
                            gsum[r] += 1.0;
                        }
                    }
                }
            }
            let n = (s.slices * s.hw) as f64;
            let dice: f64 = (0..regions)
                .map(|r| (2.0 * inter[r] + s.eps) / (psum[r] + gsum[r] + s.eps))
                .sum::<f64>()
                / regions as f64;
            total += ce / n + 1.0 - dice;
        }
        total / s.subjects as f64
    }

    /// Checks `dice_ce` of `s` against [`dice_ce_direct`] and its gradient by finite
    /// differences; returns the loss and a gradient buffer to reuse.
    fn value_and_gradient(
        what: &str,
        s: &DiceCe,
        logits: &mut [f64],
        labels: &[u8],
    ) -> (f64, Vec<f64>) {
        let mut grad = vec![f64::NAN; s.len()];
        let loss = dice_ce(s, logits, labels, &mut grad);
        let want = dice_ce_direct(s, logits, labels);
        assert!((loss - want).abs() < 1e-13, "{what}: {loss} vs {want}");
        let mut scratch = vec![0.0; s.len()];
        check(
            &format!("{what} dice_ce dlogits"),
            logits,
            &grad,
            1000,
            1e-8,
            |z| dice_ce(s, z, labels, &mut scratch),
        );
        (loss, scratch)
    }

    /// BraTS's nested regions over the classes {background, 1, 2, 4}: whole tumour, tumour
    /// core, enhancing tumour.
    const NESTED: &[u32] = &[0b1110, 0b1010, 0b1000];

    #[test]
    fn dice_ce_nested_regions_value_and_gradient() {
        let (mut s, mut logits, labels) = dice_inputs();
        s.regions = NESTED;
        s.fg_weight = 3.0;
        let (_, mut scratch) = value_and_gradient("nested", &s, &mut logits, &labels);
        // Region-based and per-class losses differ where the tumour classes are confused:
        // a pixel of class 2 predicted as class 1 is a whole-tumour hit, a per-class miss.
        let per_class = DiceCe {
            regions: &[1 << 1, 1 << 2, 1 << 3],
            ..s
        };
        let confused: Vec<f64> = (0..s.len())
            .map(|i| {
                let (row, c, q) = (i / (4 * s.hw), i / s.hw % 4, i % s.hw);
                let label = usize::from(labels[row * s.hw + q]);
                let predicted = if label == 2 { 1 } else { label };
                if c == predicted { 8.0 } else { 0.0 }
            })
            .collect();
        let whole = dice_ce(&s, &confused, &labels, &mut scratch);
        let split = dice_ce(&per_class, &confused, &labels, &mut scratch);
        assert!(whole < split, "region-based {whole} vs per-class {split}");
    }

    #[test]
    fn dice_ce_value_and_gradient() {
        let (s, mut logits, labels) = dice_inputs();
        let mut grad = vec![f64::NAN; s.len()];
        let loss = dice_ce(&s, &logits, &labels, &mut grad);
        let want = dice_ce_direct(&s, &logits, &labels);
        assert!((loss - want).abs() < 1e-13, "{loss} vs {want}");
        let mut scratch = vec![0.0; s.len()];
        check("dice_ce dlogits", &mut logits, &grad, 1000, 1e-8, |z| {
            dice_ce(&s, z, &labels, &mut scratch)
        });
        // The background-only subject's tumour logits are pushed down, its background up.
        let per = s.slices * 4 * s.hw;
        let second = &grad[per..2 * per];
        for q in 0..s.hw {
            assert!(second[q] < 0.0, "background gradient {}", second[q]);
            for c in 1..4 {
                assert!(second[c * s.hw + q] > 0.0);
            }
        }
        // Large logits stay finite.
        let big: Vec<f64> = logits.iter().map(|v| 300.0 * v).collect();
        let l = dice_ce(&s, &big, &labels, &mut scratch);
        assert!(
            l.is_finite() && scratch.iter().all(|g| g.is_finite()),
            "{l}"
        );
    }

    #[test]
    fn dice_ce_weighted_value_and_gradient() {
        let (mut s, mut logits, labels) = dice_inputs();
        s.fg_weight = 7.5;
        let (loss, mut scratch) = value_and_gradient("weighted", &s, &mut logits, &labels);
        // The weight raises the loss where tumour pixels are poorly predicted.
        let unweighted = DiceCe {
            fg_weight: 1.0,
            ..s
        };
        assert!(loss > dice_ce(&unweighted, &logits, &labels, &mut scratch));
    }

    #[test]
    fn dice_ce_f32_agrees_with_f64() {
        let (s, logits, labels) = dice_inputs();
        let mut g64 = vec![0.0; s.len()];
        let l64 = dice_ce(&s, &logits, &labels, &mut g64);
        let z32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
        let mut g32 = vec![0.0f32; s.len()];
        let l32 = dice_ce(&s, &z32, &labels, &mut g32);
        assert!((l32 - l64).abs() < 1e-6 * l64, "{l32} vs {l64}");
        for (x, y) in g32.iter().zip(&g64) {
            assert!((*x as f64 - y).abs() < 1e-7, "{x} vs {y}");
        }
    }
}
