//! Who the subjects are: ids, age, sex, diagnosis, site and whether they carry a tumour, each a
//! pure function of (seed, cohort, subject index), so a cohort's first subjects do not change
//! when more are asked for.
use super::atrophy::Diagnosis;
use super::random::{cohort_offset, subject_rng, uniform};
use super::scanner::SITE_NAMES;
use crate::cli::Cohort;
use rand::RngExt;

/// The demographics and lesions of one subject.
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectPlan {
    pub index: usize,
    pub id: String,
    /// Years, one decimal (the manifest's value is the one the anatomy used).
    pub age: f64,
    pub male: bool,
    pub diagnosis: Diagnosis,
    /// Index into the sites of [`super::scanner::site`].
    pub site: usize,
    pub tumour: bool,
}

impl SubjectPlan {
    pub fn sex(&self) -> &'static str {
        if self.male { "M" } else { "F" }
    }

    pub fn site_name(&self) -> &'static str {
        SITE_NAMES[self.site % SITE_NAMES.len()]
    }
}

/// The name that keys a cohort's random streams.
pub fn cohort_key(cohort: Cohort) -> &'static str {
    match cohort {
        Cohort::Healthy => "healthy",
        Cohort::Clinical => "clinical",
    }
}

/// Id prefixes differ between cohorts so ids never collide when corpora are combined.
pub fn subject_id(cohort: Cohort, index: usize) -> String {
    let prefix = match cohort {
        Cohort::Healthy => "HC",
        Cohort::Clinical => "CL",
    };
    format!("{prefix}{index:04}")
}

/// Golden-ratio and silver-ratio steps: consecutive subjects spread evenly over [0, 1), so a
/// fraction of any cohort size is met closely (AD about half, tumours about the fraction)
/// without the plan of subject i depending on the cohort size.
const DIAGNOSIS_STEP: f64 = 0.618_033_988_749_894_8;
const TUMOUR_STEP: f64 = 0.414_213_562_373_095_1;

pub fn plan_subject(seed: u64, cohort: Cohort, index: usize, tumour_fraction: f64) -> SubjectPlan {
    let key = cohort_key(cohort);
    let mut rng = subject_rng(seed, key, index, "demographics");
    let male = rng.random_bool(0.5);
    let site = rng.random_range(0..SITE_NAMES.len());
    let (diagnosis, age, tumour) = match cohort {
        Cohort::Healthy => (Diagnosis::Cn, uniform(&mut rng, 20.0, 90.0), false),
        Cohort::Clinical => {
            let d = (cohort_offset(seed, key, "diagnosis") + index as f64 * DIAGNOSIS_STEP).fract();
            let t = (cohort_offset(seed, key, "tumour") + index as f64 * TUMOUR_STEP).fract();
            let diagnosis = if d < 0.5 {
                Diagnosis::Ad
            } else {
                Diagnosis::Cn
            };
            // The same age range for both groups: age must not give the diagnosis away.
            (
                diagnosis,
                uniform(&mut rng, 55.0, 90.0),
                t < tumour_fraction,
            )
        }
    };
    SubjectPlan {
        index,
        id: subject_id(cohort, index),
        age: (age * 10.0).round() / 10.0,
        male,
        diagnosis,
        site,
        tumour,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clinical_cohort_mixes_diagnoses_and_tumours_as_asked() {
        let plans: Vec<_> = (0..40)
            .map(|i| plan_subject(5, Cohort::Clinical, i, 0.3))
            .collect();
        let ad = plans
            .iter()
            .filter(|p| p.diagnosis == Diagnosis::Ad)
            .count();
        let tumours = plans.iter().filter(|p| p.tumour).count();
        assert!((16..=24).contains(&ad), "{ad} AD of 40");
        assert!((10..=14).contains(&tumours), "{tumours} tumours of 40");
        for p in &plans {
            assert!((55.0..=90.0).contains(&p.age));
        }
        let healthy: Vec<_> = (0..40)
            .map(|i| plan_subject(5, Cohort::Healthy, i, 0.3))
            .collect();
        assert!(
            healthy
                .iter()
                .all(|p| !p.tumour && p.diagnosis == Diagnosis::Cn)
        );
        assert!(healthy.iter().all(|h| plans.iter().all(|c| c.id != h.id)));
        assert_eq!(plans[3], plan_subject(5, Cohort::Clinical, 3, 0.3));
    }
}
