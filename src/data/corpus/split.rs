//! The train/validation split: a pure function of (seed, the set of subject ids), so the same
//! subjects land in validation whatever the manifest order, and all sessions of one subject
//! stay on the same side (no subject leaks from training into validation).
use super::Split;
use std::collections::BTreeSet;

/// How many distinct subjects go to validation: round(fraction * n), but at least one when the
/// fraction is positive and at least one left for training when it is below one (n >= 2).
pub fn val_count(val_fraction: f64, n_subjects: usize) -> usize {
    let mut k = (val_fraction * n_subjects as f64).round() as usize;
    k = k.min(n_subjects);
    if n_subjects >= 2 {
        if val_fraction > 0.0 && k == 0 {
            k = 1;
        }
        if val_fraction < 1.0 && k == n_subjects {
            k = n_subjects - 1;
        }
    }
    k
}

/// The split of each entry of `ids` (one entry per packed volume; repeated ids are sessions
/// of one subject). Distinct ids are ordered by BLAKE3(seed as 8 little-endian bytes, id) and
/// the first `val_count` of them are validation.
pub fn split_subjects<S: AsRef<str>>(ids: &[S], val_fraction: f64, seed: u64) -> Vec<Split> {
    let distinct: BTreeSet<&str> = ids.iter().map(AsRef::as_ref).collect();
    let mut keyed: Vec<([u8; 32], &str)> = distinct
        .into_iter()
        .map(|id| {
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes());
            h.update(id.as_bytes());
            (*h.finalize().as_bytes(), id)
        })
        .collect();
    keyed.sort();
    let k = val_count(val_fraction, keyed.len());
    let val: BTreeSet<&str> = keyed[..k].iter().map(|(_, id)| *id).collect();
    ids.iter()
        .map(|id| {
            if val.contains(id.as_ref()) {
                Split::Val
            } else {
                Split::Train
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ignores_order_and_keeps_sessions_together() {
        let ids: Vec<String> = (0..40).map(|i| format!("S{i:03}")).collect();
        let mut with_sessions = ids.clone();
        with_sessions.extend(ids.iter().take(10).cloned());
        let a = split_subjects(&with_sessions, 0.25, 7);
        assert_eq!(a[..40].iter().filter(|s| **s == Split::Val).count(), 10);
        for i in 0..10 {
            assert_eq!(a[i], a[40 + i], "sessions of {} split apart", ids[i]);
        }
        let mut reversed = ids.clone();
        reversed.reverse();
        let b = split_subjects(&reversed, 0.25, 7);
        for (i, id) in reversed.iter().enumerate() {
            let j = ids.iter().position(|x| x == id).unwrap_or(usize::MAX);
            assert_eq!(b[i], a[j]);
        }
        assert_ne!(split_subjects(&ids, 0.25, 8), a[..40].to_vec());
    }

    #[test]
    fn val_count_edges() {
        assert_eq!(val_count(0.1, 100), 10);
        assert_eq!(val_count(0.1, 3), 1);
        assert_eq!(val_count(0.0, 3), 0);
        assert_eq!(val_count(0.9, 2), 1);
        assert_eq!(val_count(1.0, 4), 4);
        assert_eq!(val_count(0.5, 1), 1);
        assert_eq!(val_count(0.5, 0), 0);
    }
}
