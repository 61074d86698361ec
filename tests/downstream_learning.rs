//! The learning criteria, through the binary at the tiny preset (32x38x32 at 6 mm):
//! synthesise and pack a clinical cohort, fine-tune each task from scratch on fold 0 and
//! check `metrics.json`:
//!
//! - diagnosis (CN vs AD): the lower end of the AUC's bootstrap 95 % interval above 0.5;
//! - brain age: MAE at most 0.8 x the MAE of predicting the training mean;
//! - tumour segmentation: whole-tumour Dice at least 0.5.
//!
//! The figures measured on the development VM are in docs/PERFORMANCE.md ("learning
//! criteria"). Diagnosis and age share one cohort of 120 subjects, synthesised once per test
//! binary; segmentation makes a tumour-only one. Synth is seeded and training deterministic,
//! so the files and the figures are the same on every run (about 5.5 min for the file on 2
//! cores in the dev profile, 2.2 of them segmentation's).
mod common;

use common::{mtx, synth_and_pack_tiny};
use std::path::{Path, PathBuf};

fn ok(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mtx-hpc failed:\n{text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `synth --cohort clinical` of `subjects` with `tumours` of them tumour-bearing (a fraction),
/// packed at the tiny grid.
fn cohort(dir: &Path, subjects: usize, tumours: f64, seed: u64) -> PathBuf {
    let (synth, c) = (dir.join("synth"), dir.join("clinical.h5"));
    let (n, t, seed) = (subjects.to_string(), tumours.to_string(), seed.to_string());
    synth_and_pack_tiny(
        &synth,
        &c,
        &[
            "--cohort",
            "clinical",
            "--subjects",
            &n,
            "--tumour-fraction",
            &t,
            "--seed",
            &seed,
        ],
        &[],
    );
    std::fs::remove_dir_all(&synth).unwrap();
    c
}

/// Fine-tunes `task` from scratch with `extra` options and returns metrics.json's metrics.
fn finetune(dir: &Path, corpus: &Path, task: &str, extra: &[&str]) -> serde_json::Value {
    let out = dir.join(task);
    let mut args = vec![
        "finetune",
        "--task",
        task,
        "--corpus",
        s(corpus),
        "--scratch",
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    let log = ok(&mtx(&args));
    let text = std::fs::read_to_string(out.join("metrics.json")).unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    println!("{log}\n{text}");
    file["metrics"].clone()
}

fn metric(m: &serde_json::Value, name: &str) -> f64 {
    m[name]
        .as_f64()
        .unwrap_or_else(|| panic!("{name} is null: {m}"))
}

/// One clinical cohort for diagnosis and age (synth seed 0, 120 subjects, the default tumour
/// fraction 0.3), made once per test binary.
fn clinical() -> &'static Path {
    static COHORT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COHORT.get_or_init(|| cohort(&common::shared_dir("clinical"), 120, 0.3, 0))
}

/// CN vs AD (AD: a 20-30 % smaller hippocampus and more global atrophy than age gives): the
/// lower end of the AUC's bootstrap interval over the 24 test subjects is above chance.
/// With 24 subjects that needs an AUC of about 0.75, and a from-scratch run varies by about
/// 0.08 AUC with the training seed (or with any change to the rounding of its arithmetic):
/// 25 epochs passed for seeds 0-3 (interval from 0.60, 0.73, 0.51, 0.51) where 12 epochs
/// passed for two of them (docs/PERFORMANCE.md, "learning criteria").
#[test]
fn diagnosis_auc_interval_is_above_chance() {
    let tmp = tempfile::tempdir().unwrap();
    let m = finetune(
        tmp.path(),
        clinical(),
        "diagnosis",
        &["--epochs", "25", "--lr", "1e-3", "--schedule", "cosine"],
    );
    let (auc, low) = (metric(&m, "auc"), metric(&m, "auc_ci95_low"));
    assert!(low > 0.5, "AUC {auc}: its 95 % interval starts at {low}");
}

/// The age run: a large learning rate decayed by the cosine schedule over 40 epochs, AdamW's
/// weight decay against the overfitting of 77 fitting subjects. docs/PERFORMANCE.md: on the
/// cohort with 1-5 cm tumours, 7.05 y without the schedule, 6.58 y with it, 5.91 y with the
/// decay too (20 epochs); with the 3-7 cm tumours of now the 20-epoch run gave 6.56 y and this
/// one 4.68 y (0.60 x the baseline of 7.86 y; the epoch kept 13).
const AGE: &[&str] = &[
    "--epochs",
    "40",
    "--lr",
    "2e-3",
    "--schedule",
    "cosine",
    "--weight-decay",
    "0.5",
];

/// Brain age from atrophy (ventricles, cortex, sulci; AD adds load on top, so age and
/// diagnosis are confounded): the MAE is at most 0.8 x predicting the training mean.
#[test]
fn age_mae_beats_the_training_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let m = finetune(tmp.path(), clinical(), "age", AGE);
    let (mae, base) = (metric(&m, "mae"), metric(&m, "mae_train_mean"));
    assert!(
        mae <= 0.8 * base,
        "age MAE {mae:.3} is {:.3} x the training-mean MAE {base:.3} (at most 0.8 wanted)",
        mae / base
    );
}

/// Whole-tumour Dice at least 0.5 on a tumour-only clinical cohort (60 subjects, every one
/// with a tumour, 4 folds: 36 fitting subjects, 15 test subjects). Measured on the
/// development VM (docs/PERFORMANCE.md), with segmentation's default options: 0.562 (tumour
/// core 0.441, enhancing 0.438), the epoch kept 25 of 40. The synth's tumours are 3-7 cm across, as BraTS's whole tumours; with
/// the earlier 1-5 cm (half under 2.2 cm: 2-3 voxels at 6 mm) the same options reached 0.202.
#[test]
fn segmentation_whole_tumour_dice() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = cohort(tmp.path(), 60, 1.0, 1);
    let m = finetune(
        tmp.path(),
        &corpus,
        "segmentation",
        // Segmentation's own defaults: 40 epochs, batch 1, lr 1e-2 (cosine), tumour weight 5.
        &["--folds", "4"],
    );
    let dice = metric(&m, "dice_wt");
    eprintln!("whole-tumour Dice {dice:.3}");
    assert!(
        dice >= 0.5,
        "whole-tumour Dice {dice:.3} (at least 0.5 wanted)"
    );
}
