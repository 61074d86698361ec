//! Cross-validation folds for a downstream task, the inner validation split of a fold's
//! training part, and nested label-fraction subsets.
//!
//! The unit is the subject: all labelled sessions of a subject go to the same fold, so no
//! subject is ever on both sides of a split. Subjects are stratified by the task's label
//! (docs/DOWNSTREAM.md, "Folds"): diagnosis by class; age by quintiles of the labelled
//! subjects' ages; segmentation into "no tumour" and tertiles of the tumour-bearing subjects'
//! whole-tumour volume. A subject's stratum comes from its first labelled session (by session
//! name). Random order within a stratum is the order of a keyed hash of (seed, purpose,
//! subject id), so it does not depend on the order of the input, nor on which other subjects
//! are present.
use super::Task;
use anyhow::{Result, bail};
use std::collections::BTreeMap;

/// A session's label for the task at hand.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskLabel {
    /// Diagnosis class, e.g. "CN" or "AD".
    Class(String),
    /// Age in years.
    Age(f64),
    /// Whole-tumour volume in voxels (labels 1, 2, 4); 0 for a subject without a tumour.
    TumourVoxels(u64),
}

impl TaskLabel {
    fn task(&self) -> Task {
        match self {
            TaskLabel::Class(_) => Task::Diagnosis,
            TaskLabel::Age(_) => Task::Age,
            TaskLabel::TumourVoxels(_) => Task::Segmentation,
        }
    }
}

/// One session of the corpus with its label for the task (None: not labelled for it).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionLabel {
    pub subject: String,
    pub session: String,
    pub label: Option<TaskLabel>,
}

/// A labelled subject: its labelled sessions (sorted) and its stratum.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    pub id: String,
    pub sessions: Vec<String>,
    pub stratum: usize,
}

/// A set of subjects (a fold's test or training part, a subset of one), in id order.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub subjects: Vec<Subject>,
    /// Number of strata of the folds this part came from (stratum indices are below it).
    pub n_strata: usize,
}

/// The two sides of one fold.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub train: Part,
    pub test: Part,
}

/// K stratified, grouped folds over the labelled subjects of a task.
#[derive(Clone, Debug)]
pub struct Folds {
    pub task: Task,
    pub k: usize,
    pub seed: u64,
    /// Labelled subjects in id order.
    pub subjects: Vec<Subject>,
    /// The fold of each subject.
    pub fold_of: Vec<usize>,
    /// A name per stratum, e.g. "AD", "age 20.0-34.5", "no tumour".
    pub strata: Vec<String>,
    /// Subjects without a labelled session, left out.
    pub left_out_subjects: Vec<String>,
    /// Sessions without the label (of subjects left out or kept), left out.
    pub left_out_sessions: usize,
}

/// A 256-bit sort key for `id`: a keyed hash, so orders are random but reproducible.
fn shuffle_key(seed: u64, purpose: &str, id: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"mtx-hpc downstream v1\0");
    h.update(&seed.to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(b"\0");
    h.update(id.as_bytes());
    *h.finalize().as_bytes()
}

/// Indices `members` (into `subjects`) in the random order of (seed, purpose).
fn shuffled(subjects: &[Subject], members: &mut [usize], seed: u64, purpose: &str) {
    members.sort_by_cached_key(|&i| shuffle_key(seed, purpose, &subjects[i].id));
}

/// Quantile bins by rank: the value at rank r of n goes to bin r * bins / n.
fn rank_bins(values: &[(f64, &str)], bins: usize) -> (Vec<usize>, Vec<(f64, f64)>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        values[a]
            .0
            .total_cmp(&values[b].0)
            .then(values[a].1.cmp(values[b].1))
    });
    let mut bin = vec![0; values.len()];
    let mut range = vec![(f64::INFINITY, f64::NEG_INFINITY); bins];
    for (r, &i) in order.iter().enumerate() {
        let b = r * bins / values.len();
        bin[i] = b;
        range[b].0 = range[b].0.min(values[i].0);
        range[b].1 = range[b].1.max(values[i].0);
    }
    (bin, range)
}

/// Age quantile bins of the labelled subjects (at most 5).
pub const AGE_BINS: usize = 5;
/// Tumour-volume quantile bins of the tumour-bearing subjects (at most 3), plus "no tumour".
pub const TUMOUR_BINS: usize = 3;

impl Folds {
    /// Assigns the labelled subjects of `sessions` to `k` folds (fold indices 0..k).
    pub fn new(task: Task, sessions: &[SessionLabel], k: usize, seed: u64) -> Result<Self> {
        if k < 2 {
            bail!("{task}: need at least 2 folds, got {k}");
        }
        // Group by subject; a subject's label is that of its first labelled session.
        let mut by_subject: BTreeMap<&str, Vec<(&str, Option<&TaskLabel>)>> = BTreeMap::new();
        for s in sessions {
            if let Some(l) = &s.label {
                if l.task() != task {
                    bail!(
                        "subject {} session '{}': a {} label given for the {task} task",
                        s.subject,
                        s.session,
                        l.task()
                    );
                }
                if let TaskLabel::Age(a) = l {
                    if !a.is_finite() {
                        bail!(
                            "subject {} session '{}': age {a} is not finite",
                            s.subject,
                            s.session
                        );
                    }
                }
            }
            by_subject
                .entry(&s.subject)
                .or_default()
                .push((&s.session, s.label.as_ref()));
        }
        let mut subjects = Vec::new();
        let mut labels = Vec::new();
        let mut left_out_subjects = Vec::new();
        let mut left_out_sessions = 0;
        for (id, mut list) in by_subject {
            list.sort_by(|a, b| a.0.cmp(b.0));
            if let Some(w) = list.windows(2).find(|w| w[0].0 == w[1].0) {
                bail!("subject {id}: session '{}' listed twice", w[0].0);
            }
            let labelled: Vec<_> = list.iter().filter(|s| s.1.is_some()).collect();
            left_out_sessions += list.len() - labelled.len();
            match labelled.first() {
                None => left_out_subjects.push(id.to_string()),
                Some(first) => {
                    labels.push(first.1.expect("labelled").clone());
                    subjects.push(Subject {
                        id: id.to_string(),
                        sessions: labelled.iter().map(|s| s.0.to_string()).collect(),
                        stratum: 0,
                    });
                }
            }
        }
        if subjects.len() < k {
            bail!(
                "{task}: {} subjects carry the task's label ({} left out without it), too few for {k} folds",
                subjects.len(),
                left_out_subjects.len()
            );
        }
        let strata = assign_strata(&mut subjects, &labels);
        // Deal each stratum's shuffled subjects round-robin, continuing where the previous
        // stratum stopped: per stratum the folds differ by at most one subject, and so do
        // the fold sizes.
        let mut fold_of = vec![0; subjects.len()];
        let mut next = 0;
        for s in 0..strata.len() {
            let mut members: Vec<usize> = (0..subjects.len())
                .filter(|&i| subjects[i].stratum == s)
                .collect();
            shuffled(&subjects, &mut members, seed, &format!("folds {task}"));
            for &m in &members {
                fold_of[m] = next;
                next = (next + 1) % k;
            }
        }
        Ok(Folds {
            task,
            k,
            seed,
            subjects,
            fold_of,
            strata,
            left_out_subjects,
            left_out_sessions,
        })
    }

    /// Fold `i`'s test part and the training part (every other fold).
    pub fn fold(&self, i: usize) -> Result<Split> {
        if i >= self.k {
            bail!(
                "fold {i} is out of range: {} folds are numbered 0 to {}",
                self.k,
                self.k - 1
            );
        }
        let part = |test: bool| Part {
            subjects: self
                .subjects
                .iter()
                .zip(&self.fold_of)
                .filter(|(_, f)| (**f == i) == test)
                .map(|(s, _)| s.clone())
                .collect(),
            n_strata: self.strata.len(),
        };
        Ok(Split {
            train: part(false),
            test: part(true),
        })
    }

    /// One line for logs: subjects, strata with counts, what was left out.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = self
            .strata
            .iter()
            .enumerate()
            .map(|(s, name)| {
                let n = self.subjects.iter().filter(|x| x.stratum == s).count();
                format!("{name}: {n}")
            })
            .collect();
        format!(
            "{}: {} labelled subjects in {} folds (strata {}); left out {} subjects and {} sessions without the label",
            self.task,
            self.subjects.len(),
            self.k,
            counts.join(", "),
            self.left_out_subjects.len(),
            self.left_out_sessions
        )
    }
}

/// Sets each subject's stratum from its label; returns the strata names.
fn assign_strata(subjects: &mut [Subject], labels: &[TaskLabel]) -> Vec<String> {
    match &labels[0] {
        TaskLabel::Class(_) => {
            let mut names: Vec<String> = labels
                .iter()
                .map(|l| match l {
                    TaskLabel::Class(c) => c.clone(),
                    _ => unreachable!("checked: one task"),
                })
                .collect();
            let per_subject = names.clone();
            names.sort();
            names.dedup();
            for (s, c) in subjects.iter_mut().zip(&per_subject) {
                s.stratum = names.binary_search(c).expect("present");
            }
            names
        }
        TaskLabel::Age(_) => {
            let values: Vec<(f64, &str)> = labels
                .iter()
                .zip(subjects.iter())
                .map(|(l, s)| match l {
                    TaskLabel::Age(a) => (*a, s.id.as_str()),
                    _ => unreachable!("checked: one task"),
                })
                .collect();
            let bins = AGE_BINS.min(values.len());
            let (bin, range) = rank_bins(&values, bins);
            for (s, b) in subjects.iter_mut().zip(bin) {
                s.stratum = b;
            }
            range
                .iter()
                .map(|(lo, hi)| format!("age {lo:.1}-{hi:.1}"))
                .collect()
        }
        TaskLabel::TumourVoxels(_) => {
            let vox: Vec<u64> = labels
                .iter()
                .map(|l| match l {
                    TaskLabel::TumourVoxels(v) => *v,
                    _ => unreachable!("checked: one task"),
                })
                .collect();
            let tumour: Vec<usize> = (0..vox.len()).filter(|&i| vox[i] > 0).collect();
            let has_none = tumour.len() < vox.len();
            let offset = has_none as usize;
            let mut names = Vec::new();
            if has_none {
                names.push("no tumour".to_string());
            }
            for s in subjects.iter_mut() {
                s.stratum = 0;
            }
            if !tumour.is_empty() {
                let values: Vec<(f64, &str)> = tumour
                    .iter()
                    .map(|&i| (vox[i] as f64, subjects[i].id.as_str()))
                    .collect();
                let bins = TUMOUR_BINS.min(values.len());
                let (bin, range) = rank_bins(&values, bins);
                for (&i, b) in tumour.iter().zip(bin) {
                    subjects[i].stratum = offset + b;
                }
                names.extend(
                    range
                        .iter()
                        .map(|(lo, hi)| format!("tumour {lo:.0}-{hi:.0} voxels")),
                );
            }
            names
        }
    }
}

/// Orders subjects so that every prefix is stratified: within each stratum the keyed random
/// order; across strata, step h + 1 goes to the stratum with the largest n_s / (c_s + 1)
/// among those still below their upper quota ceil((h + 1) n_s / n) (Balinski and Young's
/// quota method), ties to the lower stratum index.
fn stratified_order(part: &Part, seed: u64, purpose: &str) -> Vec<usize> {
    let n = part.subjects.len();
    let mut queues: Vec<Vec<usize>> = vec![Vec::new(); part.n_strata];
    for (i, s) in part.subjects.iter().enumerate() {
        queues[s.stratum].push(i);
    }
    for q in queues.iter_mut() {
        shuffled(&part.subjects, q, seed, purpose);
    }
    let sizes: Vec<usize> = queues.iter().map(Vec::len).collect();
    let mut taken = vec![0usize; sizes.len()];
    let mut order = Vec::with_capacity(n);
    for h in 0..n {
        let mut best: Option<usize> = None;
        for s in 0..sizes.len() {
            // Below the upper quota: c_s < (h + 1) n_s / n.
            if taken[s] * n >= (h + 1) * sizes[s] {
                continue;
            }
            best = match best {
                // Prefer the larger n_s / (c_s + 1).
                Some(b) if sizes[s] * (taken[b] + 1) <= sizes[b] * (taken[s] + 1) => Some(b),
                _ => Some(s),
            };
        }
        let s = best.expect("some stratum is below its quota while h < n");
        order.push(queues[s][taken[s]]);
        taken[s] += 1;
    }
    order
}

impl Part {
    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }

    pub fn ids(&self) -> Vec<&str> {
        self.subjects.iter().map(|s| s.id.as_str()).collect()
    }

    fn pick(&self, mut idx: Vec<usize>) -> Part {
        idx.sort_unstable();
        Part {
            subjects: idx.into_iter().map(|i| self.subjects[i].clone()).collect(),
            n_strata: self.n_strata,
        }
    }

    /// The subset with `fraction` of the subjects (ceil(fraction x n), at least one), stratified
    /// and nested: for the same seed the subset at a smaller fraction lies inside the subset at
    /// a larger one, since both are prefixes of one stratified random order.
    pub fn label_fraction(&self, fraction: f64, seed: u64) -> Result<Part> {
        super::check_fraction(fraction).map_err(anyhow::Error::msg)?;
        if self.is_empty() {
            bail!("no subjects to take a label fraction of");
        }
        let m = ((fraction * self.len() as f64 - 1e-9).ceil() as usize).clamp(1, self.len());
        let order = stratified_order(self, seed, "label fraction");
        Ok(self.pick(order[..m].to_vec()))
    }

    /// Splits off a stratified validation part with round(val_fraction x n) subjects (at
    /// least one, and at least one left for training). Returns (training, validation).
    pub fn inner_split(&self, val_fraction: f64, seed: u64) -> Result<(Part, Part)> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            bail!("validation fraction {val_fraction} is outside (0, 1)");
        }
        if self.len() < 2 {
            bail!(
                "an inner validation split needs at least 2 training subjects, got {}",
                self.len()
            );
        }
        let m = ((val_fraction * self.len() as f64).round() as usize).clamp(1, self.len() - 1);
        let order = stratified_order(self, seed, "inner validation");
        Ok((
            self.pick(order[m..].to_vec()),
            self.pick(order[..m].to_vec()),
        ))
    }

    /// Subjects per stratum.
    pub fn stratum_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.n_strata];
        for s in &self.subjects {
            c[s.stratum] += 1;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn session(subject: &str, session: &str, label: Option<TaskLabel>) -> SessionLabel {
        SessionLabel {
            subject: subject.into(),
            session: session.into(),
            label,
        }
    }

    /// A cohort of `n` subjects, some with two sessions and some unlabelled, drawn from `seed`.
    fn cohort(task: Task, n: usize, seed: u64) -> Vec<SessionLabel> {
        let mut rng = crate::rng::keyed(seed, &[n as u64], "cohort");
        let mut out = Vec::new();
        for i in 0..n {
            let id = format!("S{i:04}");
            let label = |rng: &mut rand_chacha::ChaCha8Rng| -> Option<TaskLabel> {
                if crate::rng::below(rng, 10) == 0 {
                    return None;
                }
                Some(match task {
                    Task::Diagnosis => TaskLabel::Class(
                        ["CN", "AD", "MCI"][crate::rng::below(rng, 3) as usize].into(),
                    ),
                    Task::Age => TaskLabel::Age(20.0 + 70.0 * crate::rng::unit(rng)),
                    Task::Segmentation => {
                        TaskLabel::TumourVoxels(match crate::rng::below(rng, 2) {
                            0 => 0,
                            _ => crate::rng::below(rng, 5000),
                        })
                    }
                })
            };
            let sessions = 1 + crate::rng::below(&mut rng, 3);
            for s in 0..sessions {
                out.push(session(&id, &format!("ses-{s}"), label(&mut rng)));
            }
        }
        // The input order must not matter: reverse half the time.
        if seed % 2 == 1 {
            out.reverse();
        }
        out
    }

    #[test]
    fn folds_are_disjoint_complete_grouped_and_stratified() {
        for task in Task::ALL {
            for n in [6, 11, 25, 60] {
                for seed in 0..12 {
                    let k = 2 + (seed as usize % 4);
                    let sessions = cohort(task, n, seed);
                    let Ok(folds) = Folds::new(task, &sessions, k, seed) else {
                        continue; // too few labelled subjects for k folds
                    };
                    let labelled: BTreeSet<&str> = sessions
                        .iter()
                        .filter(|s| s.label.is_some())
                        .map(|s| s.subject.as_str())
                        .collect();
                    let mut seen = BTreeSet::new();
                    let mut sizes = Vec::new();
                    let mut per_stratum = vec![Vec::new(); folds.strata.len()];
                    for f in 0..k {
                        let split = folds.fold(f).unwrap();
                        let test: BTreeSet<&str> = split.test.ids().into_iter().collect();
                        let train: BTreeSet<&str> = split.train.ids().into_iter().collect();
                        assert!(test.is_disjoint(&train));
                        assert_eq!(test.len() + train.len(), labelled.len());
                        for id in &test {
                            assert!(seen.insert(id.to_string()), "{id} in two test folds");
                        }
                        sizes.push(test.len());
                        for (s, c) in split.test.stratum_counts().into_iter().enumerate() {
                            per_stratum[s].push(c);
                        }
                    }
                    // Complete over labelled subjects; the rest counted as left out.
                    let seen: BTreeSet<&str> = seen.iter().map(String::as_str).collect();
                    assert_eq!(seen, labelled);
                    assert_eq!(folds.left_out_subjects.len() + labelled.len(), n);
                    let unlabelled = sessions.iter().filter(|s| s.label.is_none()).count();
                    assert_eq!(folds.left_out_sessions, unlabelled);
                    // Grouped: a subject's labelled sessions all travel with it.
                    for s in &folds.subjects {
                        let want: BTreeSet<&str> = sessions
                            .iter()
                            .filter(|x| x.subject == s.id && x.label.is_some())
                            .map(|x| x.session.as_str())
                            .collect();
                        assert_eq!(
                            s.sessions
                                .iter()
                                .map(String::as_str)
                                .collect::<BTreeSet<_>>(),
                            want
                        );
                    }
                    let spread = |v: &[usize]| v.iter().max().unwrap() - v.iter().min().unwrap();
                    assert!(
                        spread(&sizes) <= 1,
                        "{task} n={n} seed={seed}: sizes {sizes:?}"
                    );
                    for c in &per_stratum {
                        assert!(spread(c) <= 1, "{task} n={n} seed={seed}: stratum {c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn folds_are_deterministic_and_depend_on_the_seed() {
        let sessions = cohort(Task::Diagnosis, 40, 2);
        let a = Folds::new(Task::Diagnosis, &sessions, 5, 9).unwrap();
        let b = Folds::new(Task::Diagnosis, &cohort(Task::Diagnosis, 40, 2), 5, 9).unwrap();
        assert_eq!(a.fold_of, b.fold_of);
        // The input order does not matter.
        let mut shuffled = sessions.clone();
        shuffled.rotate_left(17);
        assert_eq!(
            a.fold_of,
            Folds::new(Task::Diagnosis, &shuffled, 5, 9)
                .unwrap()
                .fold_of
        );
        let c = Folds::new(Task::Diagnosis, &sessions, 5, 10).unwrap();
        assert_ne!(a.fold_of, c.fold_of);
    }

    #[test]
    fn strata_per_task() {
        let s = [
            session("a", "1", Some(TaskLabel::Class("CN".into()))),
            session("a", "2", Some(TaskLabel::Class("AD".into()))),
            session("b", "1", Some(TaskLabel::Class("AD".into()))),
            session("c", "1", None),
        ];
        let f = Folds::new(Task::Diagnosis, &s, 2, 0).unwrap();
        assert_eq!(f.strata, vec!["AD", "CN"]);
        // a's stratum comes from its first session (CN).
        assert_eq!(f.subjects[0].stratum, 1);
        assert_eq!(f.left_out_subjects, vec!["c"]);
        assert_eq!(f.left_out_sessions, 1);
        assert!(
            f.summary().contains("2 labelled subjects")
                && f.summary().contains("left out 1 subjects")
        );

        let ages: Vec<_> = (0..10)
            .map(|i| session(&format!("s{i}"), "1", Some(TaskLabel::Age(20.0 + i as f64))))
            .collect();
        let f = Folds::new(Task::Age, &ages, 2, 0).unwrap();
        assert_eq!(f.strata.len(), 5);
        assert_eq!(f.strata[0], "age 20.0-21.0");
        assert_eq!(
            f.subjects.iter().map(|s| s.stratum).collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        );

        let tum: Vec<_> = [0u64, 0, 10, 20, 30, 40, 50, 60]
            .iter()
            .enumerate()
            .map(|(i, v)| session(&format!("t{i}"), "1", Some(TaskLabel::TumourVoxels(*v))))
            .collect();
        let f = Folds::new(Task::Segmentation, &tum, 2, 0).unwrap();
        assert_eq!(
            f.strata,
            vec![
                "no tumour",
                "tumour 10-20 voxels",
                "tumour 30-40 voxels",
                "tumour 50-60 voxels"
            ]
        );
    }

    #[test]
    fn bad_input_gives_clear_errors() {
        let s = cohort(Task::Age, 10, 0);
        let f = Folds::new(Task::Age, &s, 3, 0).unwrap();
        let e = f.fold(3).unwrap_err().to_string();
        assert!(
            e.contains("fold 3 is out of range") && e.contains("0 to 2"),
            "{e}"
        );
        assert!(
            Folds::new(Task::Age, &s, 1, 0)
                .unwrap_err()
                .to_string()
                .contains("at least 2 folds")
        );
        let e = Folds::new(Task::Age, &s, 50, 0).unwrap_err().to_string();
        assert!(e.contains("too few for 50 folds"), "{e}");
        let e = Folds::new(Task::Diagnosis, &s, 3, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a age label given for the diagnosis task"),
            "{e}"
        );
        let dup = [
            session("a", "1", Some(TaskLabel::Age(1.0))),
            session("a", "1", Some(TaskLabel::Age(2.0))),
        ];
        assert!(
            Folds::new(Task::Age, &dup, 2, 0)
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
        let train = f.fold(0).unwrap().train;
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let e = train.label_fraction(bad, 0).unwrap_err().to_string();
            assert!(e.contains("outside (0, 1]"), "{e}");
        }
        assert!(
            train
                .inner_split(1.0, 0)
                .unwrap_err()
                .to_string()
                .contains("outside (0, 1)")
        );
    }

    #[test]
    fn label_fractions_are_nested_stratified_and_deterministic() {
        for task in Task::ALL {
            for n in [5, 13, 40, 97] {
                for seed in 0..10 {
                    let Ok(folds) = Folds::new(task, &cohort(task, n, seed), 2, seed) else {
                        continue;
                    };
                    let train = folds.fold(1).unwrap().train;
                    let all = train.stratum_counts();
                    let mut prev: Option<BTreeSet<String>> = None;
                    for f in [0.1, 0.25, 0.5, 0.75, 1.0] {
                        let sub = train.label_fraction(f, seed).unwrap();
                        assert_eq!(sub, train.label_fraction(f, seed).unwrap());
                        let m = ((f * train.len() as f64 - 1e-9).ceil() as usize).max(1);
                        assert_eq!(sub.len(), m);
                        // Each stratum within one subject of its proportional share.
                        for (c, t) in sub.stratum_counts().iter().zip(&all) {
                            let want = m as f64 * *t as f64 / train.len() as f64;
                            assert!(
                                (*c as f64 - want).abs() < 1.0,
                                "{task} n={n} f={f}: {c} vs {want}"
                            );
                        }
                        let ids: BTreeSet<String> =
                            sub.ids().into_iter().map(String::from).collect();
                        if let Some(p) = &prev {
                            assert!(
                                p.is_subset(&ids),
                                "{task} n={n} seed={seed} f={f}: not nested"
                            );
                        }
                        prev = Some(ids);
                    }
                    assert_eq!(train.label_fraction(1.0, seed).unwrap(), train);
                    if train.len() >= 8 {
                        assert_ne!(
                            train.label_fraction(0.5, seed).unwrap(),
                            train.label_fraction(0.5, seed + 100).unwrap()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn inner_split_is_a_stratified_partition() {
        for seed in 0..10 {
            let folds =
                Folds::new(Task::Diagnosis, &cohort(Task::Diagnosis, 50, seed), 5, seed).unwrap();
            let train = folds.fold(seed as usize % 5).unwrap().train;
            let (fit, val) = train.inner_split(0.2, seed).unwrap();
            assert_eq!(val.len(), (0.2 * train.len() as f64).round() as usize);
            let a: BTreeSet<&str> = fit.ids().into_iter().collect();
            let b: BTreeSet<&str> = val.ids().into_iter().collect();
            assert!(a.is_disjoint(&b));
            assert_eq!(a.len() + b.len(), train.len());
            for (c, t) in val.stratum_counts().iter().zip(train.stratum_counts()) {
                let want = val.len() as f64 * t as f64 / train.len() as f64;
                assert!((*c as f64 - want).abs() < 1.0, "{c} vs {want}");
            }
            assert_eq!(
                (fit.clone(), val.clone()),
                train.inner_split(0.2, seed).unwrap()
            );
        }
        // Two subjects: one each side.
        let s = [
            session("a", "1", Some(TaskLabel::Age(1.0))),
            session("b", "1", Some(TaskLabel::Age(2.0))),
            session("c", "1", Some(TaskLabel::Age(3.0))),
            session("d", "1", Some(TaskLabel::Age(4.0))),
        ];
        let train = Folds::new(Task::Age, &s, 2, 0)
            .unwrap()
            .fold(0)
            .unwrap()
            .train;
        let (fit, val) = train.inner_split(0.01, 0).unwrap();
        assert_eq!((fit.len(), val.len()), (1, 1));
        let one = Part {
            subjects: fit.subjects,
            n_strata: fit.n_strata,
        };
        assert!(
            one.inner_split(0.5, 0)
                .unwrap_err()
                .to_string()
                .contains("at least 2")
        );
    }
}
