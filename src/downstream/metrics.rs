//! The downstream metrics. Each one gives a [`Metric`]: a value, or the reason it cannot be
//! computed (AUC on a test fold with one class, HD95 when exactly one mask is empty...), which
//! `metrics.json` stores as `null` plus the reason. Conventions are in docs/DOWNSTREAM.md;
//! the short form is in each function's comment.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A metric's value, or why there is none.
pub type Metric = Result<f64, String>;

/// Named metrics as `metrics.json` stores them: `metrics: {name: number | null}` and
/// `reasons: {name: text}` for every null.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricSet {
    pub metrics: BTreeMap<String, Option<f64>>,
    #[serde(default)]
    pub reasons: BTreeMap<String, String>,
}

impl MetricSet {
    /// Records `value` under `name`; a non-finite value becomes null with a reason.
    pub fn insert(&mut self, name: &str, value: Metric) {
        let value = value.and_then(|v| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(format!("the value is not finite ({v})"))
            }
        });
        match value {
            Ok(v) => {
                self.metrics.insert(name.to_string(), Some(v));
                self.reasons.remove(name);
            }
            Err(reason) => {
                self.metrics.insert(name.to_string(), None);
                self.reasons.insert(name.to_string(), reason);
            }
        }
    }

    /// The metric `name`, or None when it was never recorded.
    pub fn get(&self, name: &str) -> Option<Metric> {
        self.metrics.get(name).map(|v| match v {
            Some(v) => Ok(*v),
            None => Err(self
                .reasons
                .get(name)
                .cloned()
                .unwrap_or_else(|| "no reason recorded".into())),
        })
    }

    /// Every null has a reason, every reason belongs to a null, every number is finite.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in &self.metrics {
            match v {
                None if !self.reasons.contains_key(name) => {
                    return Err(format!("metric '{name}' is null without a reason"));
                }
                Some(x) if !x.is_finite() => {
                    return Err(format!("metric '{name}' is not finite"));
                }
                _ => {}
            }
        }
        for name in self.reasons.keys() {
            if !matches!(self.metrics.get(name), Some(None)) {
                return Err(format!(
                    "reason given for '{name}', which is not a null metric"
                ));
            }
        }
        Ok(())
    }
}

fn check_pairs<T>(what: &str, a: &[T], b: &[f64]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!(
            "{what}: {} labels but {} predictions",
            a.len(),
            b.len()
        ));
    }
    if a.is_empty() {
        return Err(format!("{what}: no subjects"));
    }
    if let Some(i) = b.iter().position(|v| !v.is_finite()) {
        return Err(format!("{what}: prediction {i} is not finite ({})", b[i]));
    }
    Ok(())
}

// ---------------------------------------------------------------- classification

/// Counts of a binary decision: a subject is predicted positive when its score (the
/// probability of the positive class) is at least the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

impl Confusion {
    /// `labels[i]` true for the positive class; positive prediction iff `scores[i] >= threshold`.
    pub fn at(labels: &[bool], scores: &[f64], threshold: f64) -> Result<Self, String> {
        check_pairs("confusion matrix", labels, scores)?;
        let mut c = Confusion {
            tp: 0,
            fp: 0,
            tn: 0,
            fn_: 0,
        };
        for (&y, &s) in labels.iter().zip(scores) {
            match (y, s >= threshold) {
                (true, true) => c.tp += 1,
                (true, false) => c.fn_ += 1,
                (false, true) => c.fp += 1,
                (false, false) => c.tn += 1,
            }
        }
        Ok(c)
    }

    pub fn accuracy(&self) -> Metric {
        let n = self.tp + self.fp + self.tn + self.fn_;
        if n == 0 {
            return Err("no subjects".into());
        }
        Ok((self.tp + self.tn) as f64 / n as f64)
    }

    /// TP / (TP + FN); undefined without positive subjects.
    pub fn sensitivity(&self) -> Metric {
        let p = self.tp + self.fn_;
        if p == 0 {
            return Err("no positive subjects in the test set".into());
        }
        Ok(self.tp as f64 / p as f64)
    }

    /// TN / (TN + FP); undefined without negative subjects.
    pub fn specificity(&self) -> Metric {
        let n = self.tn + self.fp;
        if n == 0 {
            return Err("no negative subjects in the test set".into());
        }
        Ok(self.tn as f64 / n as f64)
    }

    /// The mean of sensitivity and specificity; undefined unless both classes are present.
    pub fn balanced_accuracy(&self) -> Metric {
        Ok(0.5 * (self.sensitivity()? + self.specificity()?))
    }
}

/// Ranks 1..=n of `x` with ties given the mean of the ranks they span (midranks).
pub fn midranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && x[order[j]] == x[order[i]] {
            j += 1;
        }
        // Positions i..j (0-based) hold ranks i+1..=j; their mean is (i + 1 + j) / 2.
        let r = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            ranks[k] = r;
        }
        i = j;
    }
    ranks
}

/// Area under the ROC curve as the Mann-Whitney statistic: the probability that a random
/// positive scores above a random negative, a tie counting 1/2. Needs both classes.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Metric {
    check_pairs("AUC", labels, scores)?;
    let n_pos = labels.iter().filter(|&&y| y).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Err(format!(
            "AUC needs both classes; all {} test subjects are {}",
            labels.len(),
            if n_pos == 0 { "negative" } else { "positive" }
        ));
    }
    let ranks = midranks(scores);
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, y)| **y)
        .map(|(r, _)| r)
        .sum();
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Ok(u / (n_pos as f64 * n_neg as f64))
}

/// The decision threshold that maximises Youden's J = sensitivity + specificity - 1 on a
/// validation set. Candidates: the midpoints between consecutive distinct scores, and 0.5.
/// Ties in J go to the candidate nearest 0.5, then to the lower one; so when nothing beats
/// the default 0.5, 0.5 is kept. Needs both classes.
pub fn choose_threshold(labels: &[bool], scores: &[f64]) -> Metric {
    check_pairs("threshold", labels, scores)?;
    let n_pos = labels.iter().filter(|&&y| y).count();
    if n_pos == 0 || n_pos == labels.len() {
        return Err(format!(
            "choosing a threshold needs both classes; all {} validation subjects are {}",
            labels.len(),
            if n_pos == 0 { "negative" } else { "positive" }
        ));
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    let mut candidates: Vec<f64> = sorted.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    candidates.push(0.5);
    let mut best: Option<(f64, f64)> = None; // (J, threshold)
    for t in candidates {
        let c = Confusion::at(labels, scores, t)?;
        let j = c.sensitivity()? + c.specificity()? - 1.0;
        let better = match best {
            None => true,
            Some((bj, bt)) => {
                j > bj + 1e-12
                    || ((j - bj).abs() <= 1e-12
                        && ((t - 0.5).abs() < (bt - 0.5).abs()
                            || ((t - 0.5).abs() == (bt - 0.5).abs() && t < bt)))
            }
        };
        if better {
            best = Some((j, t));
        }
    }
    Ok(best.expect("0.5 is always a candidate").1)
}

// ---------------------------------------------------------------- regression

/// Mean absolute error.
pub fn mae(truth: &[f64], pred: &[f64]) -> Metric {
    check_pairs("MAE", truth, pred)?;
    Ok(truth
        .iter()
        .zip(pred)
        .map(|(t, p)| (p - t).abs())
        .sum::<f64>()
        / truth.len() as f64)
}

/// Root mean squared error.
pub fn rmse(truth: &[f64], pred: &[f64]) -> Metric {
    check_pairs("RMSE", truth, pred)?;
    let mse = truth
        .iter()
        .zip(pred)
        .map(|(t, p)| (p - t).powi(2))
        .sum::<f64>()
        / truth.len() as f64;
    Ok(mse.sqrt())
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Pearson correlation; undefined when either side is constant.
pub fn pearson_r(x: &[f64], y: &[f64]) -> Metric {
    check_pairs("Pearson r", x, y)?;
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        return Err(format!(
            "Pearson r is undefined: the {} are all equal",
            if sxx == 0.0 {
                "true values"
            } else {
                "predictions"
            }
        ));
    }
    Ok((sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

/// The linear age-bias correction of the brain-age gap: predictions regress toward the
/// cohort mean, so the raw gap (predicted - age) correlates negatively with age. Fit
/// `predicted = a + b * age` by least squares on the *training* part, then on any subject
/// `corrected gap = predicted - (a + b * age)` and `corrected prediction = age + corrected gap`.
/// This is the residual form (the idea of Le et al. 2018 and Smith et al. 2019, regressing
/// the age dependence out of the gap); the alternative that rescales the prediction,
/// `(predicted - a) / b` (de Lange and Cole 2020), is not implemented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AgeBias {
    pub a: f64,
    pub b: f64,
}

impl AgeBias {
    /// Least-squares fit of predicted on true age; needs two distinct ages.
    pub fn fit(ages: &[f64], preds: &[f64]) -> Result<Self, String> {
        check_pairs("age-bias fit", ages, preds)?;
        if let Some(i) = ages.iter().position(|v| !v.is_finite()) {
            return Err(format!("age-bias fit: age {i} is not finite"));
        }
        let (ma, mp) = (mean(ages), mean(preds));
        let saa: f64 = ages.iter().map(|a| (a - ma).powi(2)).sum();
        if saa == 0.0 {
            return Err(format!(
                "age-bias fit needs at least two distinct ages; the {} training ages are all {ma}",
                ages.len()
            ));
        }
        let sap: f64 = ages
            .iter()
            .zip(preds)
            .map(|(a, p)| (a - ma) * (p - mp))
            .sum();
        let b = sap / saa;
        Ok(AgeBias { a: mp - b * ma, b })
    }

    pub fn corrected_gap(&self, age: f64, pred: f64) -> f64 {
        pred - (self.a + self.b * age)
    }

    pub fn corrected_prediction(&self, age: f64, pred: f64) -> f64 {
        age + self.corrected_gap(age, pred)
    }
}

// ---------------------------------------------------------------- segmentation

/// The BraTS evaluation regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Labels 1, 2, 4.
    WholeTumour,
    /// Labels 1, 4.
    TumourCore,
    /// Label 4.
    Enhancing,
}

impl Region {
    pub const ALL: [Region; 3] = [Region::WholeTumour, Region::TumourCore, Region::Enhancing];

    /// The suffix of the metric names: wt, tc, et.
    pub fn short(self) -> &'static str {
        match self {
            Region::WholeTumour => "wt",
            Region::TumourCore => "tc",
            Region::Enhancing => "et",
        }
    }

    pub fn contains(self, label: u8) -> bool {
        match self {
            Region::WholeTumour => matches!(label, 1 | 2 | 4),
            Region::TumourCore => matches!(label, 1 | 4),
            Region::Enhancing => label == 4,
        }
    }

    /// The region's voxels of a label map.
    pub fn mask(self, labels: &[u8]) -> Vec<bool> {
        labels.iter().map(|&l| self.contains(l)).collect()
    }
}

/// Every label is one of 0, 1, 2, 4.
pub fn check_labels(what: &str, labels: &[u8]) -> Result<(), String> {
    match labels.iter().position(|l| !matches!(l, 0 | 1 | 2 | 4)) {
        Some(i) => Err(format!(
            "{what}: label {} at voxel {i} is not a BraTS label (0, 1, 2, 4)",
            labels[i]
        )),
        None => Ok(()),
    }
}

/// Dice of two masks: 2|A∩B| / (|A| + |B|); both empty gives 1, exactly one empty gives 0.
pub fn dice_masks(a: &[bool], b: &[bool]) -> Metric {
    if a.len() != b.len() {
        return Err(format!("Dice: masks of {} and {} voxels", a.len(), b.len()));
    }
    let (mut na, mut nb, mut both) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        na += x as usize;
        nb += y as usize;
        both += (x && y) as usize;
    }
    if na + nb == 0 {
        return Ok(1.0);
    }
    Ok(2.0 * both as f64 / (na + nb) as f64)
}

/// Dice of one region between a predicted and a true label map.
pub fn dice(pred: &[u8], truth: &[u8], region: Region) -> Metric {
    check_labels("predicted label map", pred)?;
    check_labels("true label map", truth)?;
    dice_masks(&region.mask(pred), &region.mask(truth))
}

/// A 3-D grid in the corpus layout: voxel (i, j, k) at index (i * ny + j) * nz + k, with the
/// voxel spacing in millimetres.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid3 {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
}

impl Grid3 {
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, what: &str, mask_len: usize) -> Result<(), String> {
        if self.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(format!(
                "{what}: voxel spacing {:?} is not positive",
                self.spacing
            ));
        }
        if mask_len != self.len() {
            return Err(format!(
                "{what}: mask of {mask_len} voxels on a {:?} grid",
                self.dims
            ));
        }
        Ok(())
    }
}

/// Surface voxels: foreground voxels with at least one of their 6 face neighbours background
/// or outside the grid.
pub fn surface(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = dims;
    let mut out = vec![false; mask.len()];
    for i in 0..nx {
        for j in 0..ny {
            for k in 0..nz {
                let idx = (i * ny + j) * nz + k;
                if !mask[idx] {
                    continue;
                }
                let edge = i == 0 || j == 0 || k == 0 || i + 1 == nx || j + 1 == ny || k + 1 == nz;
                out[idx] = edge
                    || !mask[idx - ny * nz]
                    || !mask[idx + ny * nz]
                    || !mask[idx - nz]
                    || !mask[idx + nz]
                    || !mask[idx - 1]
                    || !mask[idx + 1];
            }
        }
    }
    out
}

/// Lower envelope of the parabolas f(q) + s2 (p - q)^2 over the finite f(q) (Felzenszwalb
/// and Huttenlocher's 1-D distance transform); all infinite when no f(q) is finite.
fn edt_1d(f: &[f64], s2: f64, out: &mut [f64], v: &mut Vec<usize>, z: &mut Vec<f64>) {
    v.clear();
    z.clear();
    let key = |q: usize| f[q] + s2 * (q * q) as f64;
    for q in 0..f.len() {
        if !f[q].is_finite() {
            continue;
        }
        while let Some(&p) = v.last() {
            let x = (key(q) - key(p)) / (2.0 * s2 * (q - p) as f64);
            if x <= *z.last().expect("z parallels v") {
                v.pop();
                z.pop();
            } else {
                v.push(q);
                z.push(x);
                break;
            }
        }
        if v.is_empty() {
            v.push(q);
            z.push(f64::NEG_INFINITY);
        }
    }
    if v.is_empty() {
        out.fill(f64::INFINITY);
        return;
    }
    let mut k = 0;
    for (p, o) in out.iter_mut().enumerate() {
        while k + 1 < v.len() && z[k + 1] < p as f64 {
            k += 1;
        }
        let d = p as f64 - v[k] as f64;
        *o = f[v[k]] + s2 * d * d;
    }
}

/// Squared Euclidean distance in mm^2 from every voxel centre to the nearest `feature`
/// voxel centre (infinite when there is none); exact, separable over the three axes.
pub fn distance_sq(feature: &[bool], grid: Grid3) -> Vec<f64> {
    let [nx, ny, nz] = grid.dims;
    let mut d: Vec<f64> = feature
        .iter()
        .map(|&f| if f { 0.0 } else { f64::INFINITY })
        .collect();
    let (mut v, mut z) = (Vec::new(), Vec::new());
    let n_max = nx.max(ny).max(nz);
    let (mut line, mut out) = (vec![0.0; n_max], vec![0.0; n_max]);
    // Axis 2 (contiguous), then axis 1, then axis 0.
    let axes: [(usize, usize, [usize; 2], [usize; 2]); 3] = [
        (2, 1, [nx, ny], [ny * nz, nz]),
        (1, nz, [nx, nz], [ny * nz, 1]),
        (0, ny * nz, [ny, nz], [nz, 1]),
    ];
    for (axis, stride, [n_a, n_b], [s_a, s_b]) in axes {
        let n = grid.dims[axis];
        let s2 = grid.spacing[axis].powi(2);
        for a in 0..n_a {
            for b in 0..n_b {
                let base = a * s_a + b * s_b;
                for p in 0..n {
                    line[p] = d[base + p * stride];
                }
                edt_1d(&line[..n], s2, &mut out[..n], &mut v, &mut z);
                for p in 0..n {
                    d[base + p * stride] = out[p];
                }
            }
        }
    }
    d
}

/// The `p` quantile (0..=1) of sorted values, linear between order statistics (numpy's
/// default: position p (n - 1)).
pub fn quantile_sorted(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of nothing");
    let pos = p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// 95th-percentile Hausdorff distance in mm between two masks on `grid`. Convention: the
/// distances from every surface voxel of A to the nearest surface voxel of B and from every
/// surface voxel of B to the nearest surface voxel of A (voxel centres, voxel spacing in mm)
/// are pooled, and their 95th percentile taken (linear interpolation). Both empty: 0.
/// Exactly one empty: undefined, with the reason.
pub fn hd95(a: &[bool], b: &[bool], grid: Grid3) -> Metric {
    grid.check("HD95 (first mask)", a.len())?;
    grid.check("HD95 (second mask)", b.len())?;
    let na = a.iter().filter(|&&x| x).count();
    let nb = b.iter().filter(|&&x| x).count();
    match (na, nb) {
        (0, 0) => return Ok(0.0),
        (0, n) | (n, 0) => {
            return Err(format!(
                "HD95 is undefined when one mask is empty: {} is empty, {} has {n} voxels",
                if na == 0 {
                    "the prediction"
                } else {
                    "the ground truth"
                },
                if na == 0 {
                    "the ground truth"
                } else {
                    "the prediction"
                },
            ));
        }
        _ => {}
    }
    let sa = surface(a, grid.dims);
    let sb = surface(b, grid.dims);
    let to_b = distance_sq(&sb, grid);
    let to_a = distance_sq(&sa, grid);
    let mut pooled: Vec<f64> = Vec::new();
    pooled.extend((0..sa.len()).filter(|&i| sa[i]).map(|i| to_b[i].sqrt()));
    pooled.extend((0..sb.len()).filter(|&i| sb[i]).map(|i| to_a[i].sqrt()));
    pooled.sort_by(f64::total_cmp);
    Ok(quantile_sorted(&pooled, 0.95))
}

/// HD95 of one region between a predicted and a true label map.
pub fn hd95_region(pred: &[u8], truth: &[u8], region: Region, grid: Grid3) -> Metric {
    check_labels("predicted label map", pred)?;
    check_labels("true label map", truth)?;
    hd95(&region.mask(pred), &region.mask(truth), grid)
}

// ---------------------------------------------------------------- summaries

/// The mean of the defined values (e.g. HD95 over test subjects); undefined when none is,
/// with the first reason and how many were undefined.
pub fn mean_defined(values: &[Metric]) -> Metric {
    let ok: Vec<f64> = values
        .iter()
        .filter_map(|v| v.as_ref().ok().copied())
        .collect();
    if ok.is_empty() {
        return Err(match values.iter().find_map(|v| v.as_ref().err()) {
            Some(r) => format!("undefined for all {} subjects, e.g.: {r}", values.len()),
            None => "no subjects".into(),
        });
    }
    Ok(mean(&ok))
}

/// A percentile bootstrap confidence interval at `level` (e.g. 0.95) for the statistic
/// `stat` of `n` items: `resamples` draws of n indices with replacement from the keyed
/// stream (seed, "bootstrap"), the statistic of each (resamples where it is undefined, e.g.
/// an AUC resample with one class, are skipped), and the (1 - level)/2 and (1 + level)/2
/// quantiles. Undefined with fewer than 2 items or when over half the resamples are.
pub fn bootstrap_ci(
    n: usize,
    resamples: usize,
    level: f64,
    seed: u64,
    mut stat: impl FnMut(&[usize]) -> Metric,
) -> Result<(f64, f64), String> {
    if n < 2 {
        return Err(format!(
            "a bootstrap interval needs at least 2 items, got {n}"
        ));
    }
    if resamples == 0 || !(level > 0.0 && level < 1.0) {
        return Err(format!(
            "bootstrap: {resamples} resamples at level {level} (need >= 1 and a level in (0, 1))"
        ));
    }
    let mut rng = crate::rng::keyed(seed, &[n as u64], "bootstrap");
    let mut idx = vec![0usize; n];
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for i in idx.iter_mut() {
            *i = crate::rng::below(&mut rng, n as u64) as usize;
        }
        if let Ok(s) = stat(&idx) {
            if s.is_finite() {
                stats.push(s);
            }
        }
    }
    if stats.len() * 2 < resamples {
        return Err(format!(
            "the statistic is undefined in {} of {resamples} bootstrap resamples",
            resamples - stats.len()
        ));
    }
    stats.sort_by(f64::total_cmp);
    Ok((
        quantile_sorted(&stats, (1.0 - level) / 2.0),
        quantile_sorted(&stats, (1.0 + level) / 2.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn confusion_metrics_match_hand_counts() {
        let labels = [true, true, true, false, false];
        let scores = [0.9, 0.6, 0.4, 0.7, 0.1];
        let c = Confusion::at(&labels, &scores, 0.5).unwrap();
        assert_eq!(
            c,
            Confusion {
                tp: 2,
                fp: 1,
                tn: 1,
                fn_: 1
            }
        );
        assert!(close(c.accuracy().unwrap(), 3.0 / 5.0));
        assert!(close(c.sensitivity().unwrap(), 2.0 / 3.0));
        assert!(close(c.specificity().unwrap(), 0.5));
        assert!(close(c.balanced_accuracy().unwrap(), 7.0 / 12.0));
        // A score equal to the threshold is predicted positive.
        let c = Confusion::at(&labels, &scores, 0.4).unwrap();
        assert_eq!((c.tp, c.fn_), (3, 0));
        // One class: accuracy defined, the other class's rate and balanced accuracy are not.
        let c = Confusion::at(&[true, true], &[0.9, 0.2], 0.5).unwrap();
        assert!(close(c.accuracy().unwrap(), 0.5));
        assert!(c.specificity().unwrap_err().contains("no negative"));
        assert!(c.balanced_accuracy().is_err());
        assert!(
            Confusion::at(&[true], &[0.1, 0.2], 0.5)
                .unwrap_err()
                .contains("1 labels but 2")
        );
        assert!(
            Confusion::at(&[true], &[f64::NAN], 0.5)
                .unwrap_err()
                .contains("not finite")
        );
    }

    #[test]
    fn auc_counts_ties_as_half() {
        // Positives 0.8, 0.5, 0.5; negatives 0.5, 0.2. Pairs: 0.8 beats both (2), each 0.5
        // ties one and beats one (2 x 1.5): 5 of 6.
        let labels = [true, true, true, false, false];
        let scores = [0.8, 0.5, 0.5, 0.5, 0.2];
        assert!(close(roc_auc(&labels, &scores).unwrap(), 5.0 / 6.0));
        assert!(close(roc_auc(&labels, &[0.3; 5]).unwrap(), 0.5));
        assert!(close(roc_auc(&[true, false], &[0.9, 0.1]).unwrap(), 1.0));
        assert!(close(roc_auc(&[true, false], &[0.1, 0.9]).unwrap(), 0.0));
        let e = roc_auc(&[false, false], &[0.1, 0.9]).unwrap_err();
        assert!(e.contains("both classes") && e.contains("negative"), "{e}");
        assert_eq!(midranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn auc_equals_pair_counting_on_random_tied_scores() {
        let mut rng = crate::rng::keyed(7, &[], "test");
        for _ in 0..50 {
            let n = 2 + crate::rng::below(&mut rng, 30) as usize;
            let labels: Vec<bool> = (0..n)
                .map(|i| i == 0 || (i > 1 && crate::rng::unit(&mut rng) < 0.5))
                .collect();
            let scores: Vec<f64> = (0..n)
                .map(|_| crate::rng::below(&mut rng, 4) as f64)
                .collect();
            let mut wins = 0.0;
            let mut pairs = 0.0;
            for i in 0..n {
                for j in 0..n {
                    if labels[i] && !labels[j] {
                        pairs += 1.0;
                        wins += if scores[i] > scores[j] {
                            1.0
                        } else if scores[i] == scores[j] {
                            0.5
                        } else {
                            0.0
                        };
                    }
                }
            }
            assert!(close(roc_auc(&labels, &scores).unwrap(), wins / pairs));
        }
    }

    #[test]
    fn threshold_maximises_youden_and_breaks_ties_towards_half() {
        // Sorted: 0.1 N, 0.3 N, 0.32 P, 0.35 N, 0.4 P, 0.8 P. J is 2/3 at 0.31 and 0.375
        // (1/3 elsewhere, also at 0.5): the tie goes to 0.375, nearer 0.5.
        let labels = [false, false, true, false, true, true];
        let scores = [0.1, 0.3, 0.32, 0.35, 0.4, 0.8];
        assert!(close(choose_threshold(&labels, &scores).unwrap(), 0.375));
        // Separable: the midpoint of the gap.
        assert!(close(
            choose_threshold(&[false, true], &[0.2, 0.3]).unwrap(),
            0.25
        ));
        // Nothing separates: 0.5 stays.
        assert!(close(
            choose_threshold(&[false, true], &[0.7, 0.7]).unwrap(),
            0.5
        ));
        assert!(
            choose_threshold(&[true, true], &[0.2, 0.3])
                .unwrap_err()
                .contains("both classes")
        );
    }

    #[test]
    fn regression_metrics_match_hand_values() {
        let t = [1.0, 2.0, 3.0, 4.0];
        let p = [2.0, 2.0, 5.0, 4.0];
        assert!(close(mae(&t, &p).unwrap(), 0.75));
        assert!(close(rmse(&t, &p).unwrap(), (5.0f64 / 4.0).sqrt()));
        assert!(close(
            pearson_r(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap(),
            0.5
        ));
        assert!(close(
            pearson_r(&[1.0, 2.0, 3.0], &[9.0, 7.0, 5.0]).unwrap(),
            -1.0
        ));
        assert!(
            pearson_r(&[1.0, 2.0], &[3.0, 3.0])
                .unwrap_err()
                .contains("predictions")
        );
        assert!(mae(&[], &[]).unwrap_err().contains("no subjects"));
    }

    #[test]
    fn age_bias_correction_recovers_a_constructed_line() {
        // Training predictions regress to the mean exactly: pred = 30 + 0.5 age.
        let ages: Vec<f64> = (20..=80).step_by(5).map(f64::from).collect();
        let preds: Vec<f64> = ages.iter().map(|a| 30.0 + 0.5 * a).collect();
        let bias = AgeBias::fit(&ages, &preds).unwrap();
        assert!(close(bias.a, 30.0) && close(bias.b, 0.5), "{bias:?}");
        // Raw gaps run from +20 at 20 to -10 at 80; corrected gaps are all 0 on training.
        let raw: Vec<f64> = ages.iter().zip(&preds).map(|(a, p)| p - a).collect();
        assert!(pearson_r(&ages, &raw).unwrap() < -0.99);
        for (a, p) in ages.iter().zip(&preds) {
            assert!(close(bias.corrected_gap(*a, *p), 0.0));
        }
        // A test subject aged 40 predicted 55: the line expects 50, so the gap is +5.
        assert!(close(bias.corrected_gap(40.0, 55.0), 5.0));
        assert!(close(bias.corrected_prediction(40.0, 55.0), 45.0));
        assert!(
            AgeBias::fit(&[50.0, 50.0], &[1.0, 2.0])
                .unwrap_err()
                .contains("two distinct ages")
        );
    }

    #[test]
    fn dice_per_region_and_empty_masks() {
        let pred = [0, 1, 2, 4, 0, 0];
        let truth = [0, 1, 1, 0, 4, 0];
        // WT: pred {1,2,3}, truth {1,2,4}: 2*2/6. TC: pred {1,3}, truth {1,2,4}: 2/5. ET: 0.
        assert!(close(
            dice(&pred, &truth, Region::WholeTumour).unwrap(),
            2.0 / 3.0
        ));
        assert!(close(dice(&pred, &truth, Region::TumourCore).unwrap(), 0.4));
        assert!(close(dice(&pred, &truth, Region::Enhancing).unwrap(), 0.0));
        // Both empty: 1; one empty: 0.
        assert!(close(
            dice(&[0, 2], &[0, 2], Region::Enhancing).unwrap(),
            1.0
        ));
        assert!(close(
            dice(&[0, 4], &[0, 2], Region::Enhancing).unwrap(),
            0.0
        ));
        assert!(close(
            dice(&[0, 0], &[0, 4], Region::Enhancing).unwrap(),
            0.0
        ));
        let e = dice(&[0, 3], &[0, 0], Region::WholeTumour).unwrap_err();
        assert!(e.contains("label 3 at voxel 1"), "{e}");
    }

    fn grid(dims: [usize; 3], spacing: [f64; 3]) -> Grid3 {
        Grid3 { dims, spacing }
    }

    fn mask_of(dims: [usize; 3], f: impl Fn(usize, usize, usize) -> bool) -> Vec<bool> {
        let mut m = Vec::new();
        for i in 0..dims[0] {
            for j in 0..dims[1] {
                for k in 0..dims[2] {
                    m.push(f(i, j, k));
                }
            }
        }
        m
    }

    #[test]
    fn hd95_on_simple_shapes() {
        // Two 2x2x2 cubes 5 voxels apart along x: from each, half the voxels are 4 away and
        // half 5; the pooled 16 distances have 95th percentile 5 (position 14.25 of 0..15).
        let g = grid([8, 3, 3], [1.0; 3]);
        let a = mask_of(g.dims, |i, j, k| i < 2 && j < 2 && k < 2);
        let b = mask_of(g.dims, |i, j, k| (5..7).contains(&i) && j < 2 && k < 2);
        assert!(close(hd95(&a, &b, g).unwrap(), 5.0));
        // The same with 2.5 mm along x.
        assert!(close(
            hd95(&a, &b, grid(g.dims, [2.5, 1.0, 1.0])).unwrap(),
            12.5
        ));
        // One voxel against a rod of 20 along y at 2 mm: distances {2} from the voxel and
        // {2, 4, ..., 40} from the rod; pooled 21 values, position 19 is 38 (max would be 40).
        let g = grid([1, 21, 1], [1.0, 2.0, 1.0]);
        let a = mask_of(g.dims, |_, j, _| j == 0);
        let b = mask_of(g.dims, |_, j, _| j >= 1);
        assert!(close(hd95(&a, &b, g).unwrap(), 38.0));
        // Identical masks: 0. Empty cases.
        assert!(close(hd95(&b, &b, g).unwrap(), 0.0));
        let none = vec![false; g.len()];
        assert!(close(hd95(&none, &none, g).unwrap(), 0.0));
        let e = hd95(&none, &b, g).unwrap_err();
        assert!(
            e.contains("the prediction is empty") && e.contains("20 voxels"),
            "{e}"
        );
        assert!(
            hd95(&a, &none, g)
                .unwrap_err()
                .contains("the ground truth is empty")
        );
        assert!(
            hd95(&a, &b[1..], g)
                .unwrap_err()
                .contains("mask of 20 voxels")
        );
    }

    #[test]
    fn surface_of_a_solid_cube_is_its_shell() {
        let dims = [5, 5, 5];
        let cube = mask_of(dims, |i, j, k| {
            (1..4).contains(&i) && (1..4).contains(&j) && (1..4).contains(&k)
        });
        let s = surface(&cube, dims);
        assert_eq!(s.iter().filter(|&&x| x).count(), 26); // 27 less the centre
        assert!(!s[(2 * 5 + 2) * 5 + 2]);
        // On the grid's border every foreground voxel is surface.
        assert!(surface(&[true; 8], [2, 2, 2]).iter().all(|&x| x));
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let mut rng = crate::rng::keyed(3, &[], "edt test");
        for case in 0..20 {
            let dims = [
                1 + crate::rng::below(&mut rng, 7) as usize,
                1 + crate::rng::below(&mut rng, 7) as usize,
                1 + crate::rng::below(&mut rng, 7) as usize,
            ];
            let spacing = [
                0.5 + crate::rng::unit(&mut rng),
                0.5 + crate::rng::unit(&mut rng),
                2.0,
            ];
            let g = grid(dims, spacing);
            let feature: Vec<bool> = (0..g.len())
                .map(|_| crate::rng::unit(&mut rng) < 0.1)
                .collect();
            let d = distance_sq(&feature, g);
            let coords = |idx: usize| {
                let k = idx % dims[2];
                let j = (idx / dims[2]) % dims[1];
                let i = idx / (dims[1] * dims[2]);
                [i as f64, j as f64, k as f64]
            };
            for p in 0..g.len() {
                let cp = coords(p);
                let want = (0..g.len())
                    .filter(|&q| feature[q])
                    .map(|q| {
                        let cq = coords(q);
                        (0..3)
                            .map(|a| ((cp[a] - cq[a]) * spacing[a]).powi(2))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min);
                assert!(
                    (d[p] - want).abs() < 1e-9 || (d[p].is_infinite() && want.is_infinite()),
                    "case {case} dims {dims:?} voxel {p}: {} vs {want}",
                    d[p]
                );
            }
        }
    }

    #[test]
    fn metric_set_stores_null_with_reason_as_json() {
        let mut m = MetricSet::default();
        m.insert("auc", roc_auc(&[true, true], &[0.1, 0.2]));
        m.insert("accuracy", Ok(0.75));
        m.insert("bad", Ok(f64::NAN));
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["metrics"]["auc"], serde_json::Value::Null);
        assert_eq!(json["metrics"]["accuracy"], 0.75);
        assert!(
            json["reasons"]["auc"]
                .as_str()
                .unwrap()
                .contains("both classes")
        );
        assert!(
            json["reasons"]["bad"]
                .as_str()
                .unwrap()
                .contains("not finite")
        );
        assert!(json["reasons"].get("accuracy").is_none());
        let back: MetricSet = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
        back.validate().unwrap();
        assert!(back.get("auc").unwrap().is_err());
        let mut broken = m.clone();
        broken.reasons.remove("auc");
        assert!(
            broken
                .validate()
                .unwrap_err()
                .contains("'auc' is null without a reason")
        );
        // Overwriting a null with a value drops its reason.
        m.insert("auc", Ok(0.5));
        assert!(!m.reasons.contains_key("auc"));
        m.validate().unwrap();
    }

    #[test]
    fn bootstrap_is_deterministic_and_brackets_the_mean() {
        let x: Vec<f64> = (0..40).map(|i| (i % 7) as f64).collect();
        let mean_of = |idx: &[usize]| Ok(idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64);
        let a = bootstrap_ci(x.len(), 2000, 0.95, 1, mean_of).unwrap();
        assert_eq!(a, bootstrap_ci(x.len(), 2000, 0.95, 1, mean_of).unwrap());
        assert_ne!(a, bootstrap_ci(x.len(), 2000, 0.95, 2, mean_of).unwrap());
        let m = mean(&x);
        assert!(a.0 < m && m < a.1 && a.1 - a.0 < 2.0, "{a:?} around {m}");
        // Constant data: a zero-width interval.
        assert_eq!(
            bootstrap_ci(5, 100, 0.95, 0, |_| Ok(2.0)).unwrap(),
            (2.0, 2.0)
        );
        assert!(
            bootstrap_ci(1, 100, 0.95, 0, |_| Ok(2.0))
                .unwrap_err()
                .contains("at least 2")
        );
        assert!(
            bootstrap_ci(5, 100, 0.95, 0, |_| Err("x".into()))
                .unwrap_err()
                .contains("undefined in 100 of 100")
        );
        assert!(close(
            mean_defined(&[Ok(1.0), Err("e".into()), Ok(3.0)]).unwrap(),
            2.0
        ));
        assert!(
            mean_defined(&[Err("one empty".into())])
                .unwrap_err()
                .contains("one empty")
        );
        assert!(close(quantile_sorted(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5));
    }
}
