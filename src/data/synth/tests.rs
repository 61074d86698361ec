//! The labels are in the images: whole subjects rendered on their random grids, measured
//! through the known pose (age -> dark CSF volume, AD -> medial-temporal loss, tumours ->
//! labels 1/2/4 and changed intensities exactly where they are).
use super::atrophy::Diagnosis;
use super::cohort::plan_subject;
use super::phantom::BRAIN_AXES;
use super::*;
use crate::data::geometry::mul;
use std::path::Path;

/// Voxels whose anatomy-space position satisfies `region`, and a white-matter level (90th
/// percentile inside the central brain) to normalise them by.
fn voxels_in(subject: &Subject, region: impl Fn([f64; 3]) -> bool) -> (Vec<f32>, f32) {
    let m = mul(&subject.world_to_anatomy, &subject.grid.affine);
    let [nx, ny, nz] = subject.grid.dims;
    let (mut inside, mut central) = (Vec::new(), Vec::new());
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let q = apply(&m, [i as f64, j as f64, k as f64]);
                let v = subject.image[i + nx * (j + ny * k)];
                if region(q) {
                    inside.push(v);
                }
                let rho: f64 = (0..3).map(|a| (q[a] / BRAIN_AXES[a]).powi(2)).sum();
                if rho < 0.5 {
                    central.push(v);
                }
            }
        }
    }
    central.sort_by(f32::total_cmp);
    let wm = central[central.len() * 9 / 10];
    (inside, wm)
}

fn dark_fraction(subject: &Subject, region: impl Fn([f64; 3]) -> bool) -> f64 {
    let (v, wm) = voxels_in(subject, region);
    v.iter().filter(|x| **x < 0.45 * wm).count() as f64 / v.len() as f64
}

fn inner_brain(q: [f64; 3]) -> bool {
    (0..3)
        .map(|a| (q[a] / (0.8 * BRAIN_AXES[a])).powi(2))
        .sum::<f64>()
        < 1.0
}

#[test]
fn older_subjects_have_more_csf_in_the_image() {
    let mut plan = plan_subject(21, Cohort::Healthy, 2, 0.0);
    plan.age = 25.0;
    let young = generate(21, Cohort::Healthy, &plan, None);
    plan.age = 85.0;
    let old = generate(21, Cohort::Healthy, &plan, None);
    let (y, o) = (
        dark_fraction(&young, inner_brain),
        dark_fraction(&old, inner_brain),
    );
    assert!(o > 1.5 * y, "dark fraction young {y:.4}, old {o:.4}");
}

#[test]
fn ad_loses_medial_temporal_tissue_beyond_age() {
    let hippocampi = |q: [f64; 3]| {
        let c = [28.0, -5.0, -21.0];
        let d2 = (q[0].abs() - c[0]).powi(2) + (q[1] - c[1]).powi(2) + (q[2] - c[2]).powi(2);
        d2 < 10.0 * 10.0
    };
    let mut plan = plan_subject(4, Cohort::Clinical, 1, 0.0);
    plan.age = 75.0;
    plan.diagnosis = Diagnosis::Cn;
    let cn = generate(4, Cohort::Clinical, &plan, None);
    plan.diagnosis = Diagnosis::Ad;
    let ad = generate(4, Cohort::Clinical, &plan, None);
    let (c, a) = (
        dark_fraction(&cn, hippocampi),
        dark_fraction(&ad, hippocampi),
    );
    assert!(
        a > c + 0.1,
        "dark fraction near the hippocampi: CN {c:.3}, AD {a:.3}"
    );
}

#[test]
fn tumour_labels_mark_exactly_where_the_image_changed() {
    let mut plan = plan_subject(9, Cohort::Clinical, 0, 0.0);
    plan.tumour = false;
    let healthy = generate(9, Cohort::Clinical, &plan, None);
    assert!(healthy.labels.is_none());
    plan.tumour = true;
    let sick = generate(9, Cohort::Clinical, &plan, None);
    let labels = sick.labels.as_ref().expect("tumour subjects have labels");
    assert_eq!(labels.len(), sick.image.len());
    let mut sums = std::collections::BTreeMap::<u8, (f64, usize)>::new();
    let mut changed_inside = 0usize;
    for ((&l, &a), &b) in labels.iter().zip(&sick.image).zip(&healthy.image) {
        if l == 0 {
            assert_eq!(a, b, "the image changed outside the tumour labels");
        } else {
            let e = sums.entry(l).or_default();
            e.0 += a as f64;
            e.1 += 1;
            changed_inside += usize::from((a - b).abs() > 1e-3);
        }
    }
    let found: Vec<u8> = sums.keys().copied().collect();
    assert_eq!(found, vec![1, 2, 4], "labels present");
    let mean = |l: u8| sums[&l].0 / sums[&l].1 as f64;
    assert!(
        mean(1) < 0.5 * mean(4),
        "core {} vs rim {}",
        mean(1),
        mean(4)
    );
    let labelled: usize = sums.values().map(|s| s.1).sum();
    assert!(changed_inside as f64 > 0.9 * labelled as f64);
}

const COLIN27: &str = "/usr/share/mricron/templates/ch2bet.nii.gz";

#[test]
fn template_subjects_carry_age_diagnosis_and_tumours_too() {
    let path = Path::new(COLIN27);
    assert!(
        path.exists(),
        "{COLIN27} is missing: run scripts/setup.sh (Debian package mricron-data)"
    );
    let template = Template::load(path).expect("Colin27 loads");
    let mut plan = plan_subject(3, Cohort::Clinical, 2, 0.0);
    plan.diagnosis = Diagnosis::Cn;
    plan.age = 55.0;
    let young = generate(3, Cohort::Clinical, &plan, Some(&template));
    plan.age = 90.0;
    plan.diagnosis = Diagnosis::Ad;
    plan.tumour = true;
    let old = generate(3, Cohort::Clinical, &plan, Some(&template));
    let (y, o) = (
        dark_fraction(&young, inner_brain),
        dark_fraction(&old, inner_brain),
    );
    eprintln!("template dark fraction young CN {y:.4}, old AD {o:.4}");
    assert!(o > 1.2 * y, "dark fraction young CN {y:.4}, old AD {o:.4}");
    let labels = old.labels.as_ref().expect("labels");
    let mut present = [false; 5];
    for &l in labels {
        present[l as usize] = true;
    }
    assert!(present[1] && present[2] && present[4], "{present:?}");
}

#[test]
fn every_field_of_view_holds_the_whole_head() {
    // Head = brain + CSF, skull and scalp (15 mm), plus 4 mm for the smooth deformation; the
    // neck below the skull base may be cut, as scanners do.
    let head = BRAIN_AXES.map(|a| a + 19.0);
    for i in 0..40 {
        let plan = plan_subject(8, Cohort::Healthy, i, 0.0);
        let g = subject_geometry(8, Cohort::Healthy, &plan);
        let m = mul(&g.world_to_anatomy, &g.grid.affine);
        let [nx, ny, nz] = g.grid.dims.map(|d| d as f64 - 1.0);
        let steps = 24;
        for a in 0..=steps {
            for b in 0..=steps {
                let (s, t) = (a as f64 / steps as f64, b as f64 / steps as f64);
                for v in [
                    [0.0, s * ny, t * nz],
                    [nx, s * ny, t * nz],
                    [s * nx, 0.0, t * nz],
                    [s * nx, ny, t * nz],
                    [s * nx, t * ny, 0.0],
                    [s * nx, t * ny, nz],
                ] {
                    let q = apply(&m, v);
                    let rho: f64 = (0..3).map(|k| (q[k] / head[k]).powi(2)).sum();
                    assert!(rho > 1.0 || q[2] < -55.0, "{}: head cut at {q:?}", plan.id);
                }
            }
        }
    }
}
