//! `mtx-hpc pretrain` through the binary on a tiny corpus: exact resume (within a stage and
//! across the triplet -> MEVP boundary), and each bad input ending with a clear error.
mod common;

use mtx_hpc::model::Layout;
use mtx_hpc::train::Checkpoint;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

/// A tiny-preset corpus of 10 synthetic subjects (8 train, 2 validation), made once.
fn corpus() -> &'static Path {
    static C: OnceLock<PathBuf> = OnceLock::new();
    C.get_or_init(|| {
        let dir = common::shared_dir("pretrain");
        common::tiny_corpus(&dir, 10, 0)
    })
}

fn run_dir(name: &str) -> PathBuf {
    let d = corpus().parent().unwrap().join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn pretrain(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mtx-hpc"));
    cmd.args([
        "pretrain",
        "--corpus",
        corpus().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    cmd.args(["--preset", "tiny"]);
    if !extra.contains(&"--batch") {
        cmd.args(["--batch", "2"]);
    }
    cmd.args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run mtx-hpc")
}

fn ok(o: &Output) -> String {
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    text
}

fn fails(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}':\n{err}");
    }
}

/// Losses of metrics.jsonl, without the timings (which differ run to run).
fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {} {} {} {} {:?}",
                v["step"],
                v["stage"],
                v["loss"],
                v["lr"],
                v["grad_norm"],
                v.get("val_loss")
            )
        })
        .collect()
}

fn final_state(dir: &Path) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let ckpt = Checkpoint::read(&dir.join("final.h5")).unwrap();
    let layout = Layout::new(&ckpt.meta.model);
    let params = ckpt.read_params(&layout).unwrap();
    let (m, v) = ckpt.read_moments(&layout).unwrap().unwrap();
    (params, m, v)
}

#[test]
fn resumed_runs_are_bit_identical_to_uninterrupted_ones() {
    let cfg = corpus().parent().unwrap().join("every-step.toml");
    std::fs::write(&cfg, "checkpoint_every = 1\nkeep_last = 2\n").unwrap();
    let args = ["--steps", "5", "--config", cfg.to_str().unwrap()];
    let straight = run_dir("straight");
    ok(&pretrain(&straight, &args, &[]));
    // Killed in the triplet stage (after 3 steps), then killed again in MEVP (after 4 more
    // steps, crossing the boundary at step 5), then run to the end.
    let resumed = run_dir("resumed");
    ok(&pretrain(&resumed, &args, &[("MTX_TEST_STOP_AFTER", "3")]));
    let text = ok(&pretrain(
        &resumed,
        &[&args[..], &["--resume", "auto"]].concat(),
        &[("MTX_TEST_STOP_AFTER", "4")],
    ));
    assert!(text.contains("resuming from"), "{text}");
    ok(&pretrain(
        &resumed,
        &[&args[..], &["--resume", "auto"]].concat(),
        &[],
    ));
    assert_eq!(losses(&straight), losses(&resumed));
    assert_eq!(losses(&straight).len(), 10);
    let (a, b) = (final_state(&straight), final_state(&resumed));
    assert!(a.0 == b.0, "parameters differ");
    assert!(a.1 == b.1 && a.2 == b.2, "Adam moments differ");
}

#[test]
fn bad_settings_are_clear_errors() {
    let dir = run_dir("bad");
    fails(&pretrain(&dir, &["--batch", "3"], &[]), &["even"]);
    fails(&pretrain(&dir, &["--lr", "0"], &[]), &["lr"]);
    fails(
        &pretrain(&dir, &["--batch", "20"], &[]),
        &["larger than the training set"],
    );
    let cfg = corpus().parent().unwrap().join("typo.toml");
    std::fs::write(&cfg, "bacth = 4\n").unwrap();
    fails(
        &pretrain(&dir, &["--config", cfg.to_str().unwrap()], &[]),
        &["typo.toml", "bacth"],
    );
    // The tiny corpus does not fit the paper preset.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mtx-hpc"));
    let o = cmd
        .args([
            "pretrain",
            "--corpus",
            corpus().to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
            "--preset",
            "paper",
        ])
        .output()
        .unwrap();
    fails(&o, &["tiny.h5", "32"]);
}

#[test]
fn a_run_folder_is_not_reused_by_accident_and_checkpoints_must_fit() {
    let dir = run_dir("reuse");
    ok(&pretrain(
        &dir,
        &["--steps", "1", "--stage", "triplet"],
        &[],
    ));
    fails(
        &pretrain(&dir, &["--steps", "1", "--stage", "triplet"], &[]),
        &["holds another run", "--resume"],
    );
    ok(&pretrain(
        &dir,
        &["--steps", "1", "--stage", "triplet", "--force"],
        &[],
    ));
    // A checkpoint of another preset, to --resume and --init-encoder.
    let ckpt = dir.join("final.h5");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .args([
            "pretrain",
            "--corpus",
            corpus().to_str().unwrap(),
            "--out",
            run_dir("other").to_str().unwrap(),
        ])
        .args([
            "--preset",
            "tiny",
            "--batch",
            "2",
            "--steps",
            "1",
            "--init-encoder",
            ckpt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    ok(&o);
    let broken = corpus().parent().unwrap().join("not-a-checkpoint.h5");
    std::fs::write(&broken, b"garbage").unwrap();
    fails(
        &pretrain(&run_dir("x"), &["--resume", broken.to_str().unwrap()], &[]),
        &["not-a-checkpoint.h5"],
    );
    fails(
        &pretrain(
            &run_dir("y"),
            &["--init-encoder", broken.to_str().unwrap()],
            &[],
        ),
        &["not-a-checkpoint.h5"],
    );
}

#[test]
fn a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let dir = run_dir("nan");
    let cfg = corpus().parent().unwrap().join("every-step-nan.toml");
    std::fs::write(&cfg, "checkpoint_every = 1\n").unwrap();
    let o = pretrain(
        &dir,
        &["--steps", "4", "--config", cfg.to_str().unwrap()],
        &[("MTX_TEST_NAN_AT_STEP", "3")],
    );
    fails(&o, &["step 3", "ckpt-step00000002.h5"]);
    let c = Checkpoint::read(&dir.join("ckpt-step00000002.h5")).unwrap();
    assert_eq!(c.meta.step, 2);
    assert!(!dir.join("ckpt-step00000003.h5").exists());
}

#[test]
fn cached_mevp_targets_change_nothing() {
    // 8 training subjects at batch 2: 4 steps per epoch, so epochs 2 and 3 read the cache.
    let args = |cfg: &Path| -> Vec<String> {
        [
            "--stage",
            "mevp",
            "--steps",
            "12",
            "--config",
            cfg.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let on = corpus().parent().unwrap().join("cache-on.toml");
    let off = corpus().parent().unwrap().join("cache-off.toml");
    std::fs::write(&on, "cache_targets = true\n").unwrap();
    std::fs::write(&off, "cache_targets = false\n").unwrap();
    let (a, b) = (run_dir("cache-on"), run_dir("cache-off"));
    let a_args = args(&on);
    let b_args = args(&off);
    ok(&pretrain(
        &a,
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    ));
    ok(&pretrain(
        &b,
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    ));
    assert_eq!(losses(&a), losses(&b));
    assert!(
        final_state(&a) == final_state(&b),
        "cached and uncached runs differ"
    );
    let compute = |dir: &Path, epoch: u64| -> f64 {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["epoch"] == epoch)
            .map(|v| v["compute_s"].as_f64().unwrap())
            .sum()
    };
    eprintln!(
        "MEVP compute s in epoch 2: cached {:.3}, uncached {:.3}",
        compute(&a, 2),
        compute(&b, 2)
    );
}

/// The MEVP options through the binary: joint sequence, dropout and a trainable encoder
/// together resume bit for bit (dropout masks are keyed, not streamed), the encoder moves
/// only when it is trainable, and dropout changes the training losses.
#[test]
fn mevp_options_train_and_resume_exactly() {
    let dir = corpus().parent().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("checkpoint_every = 1\n{text}")).unwrap();
        p
    };
    let all = write(
        "options-all.toml",
        "joint_sequence = true\ndropout = 0.2\ntrainable_encoder_in_mevp = true\n",
    );
    let frozen = write(
        "options-frozen.toml",
        "joint_sequence = true\ndropout = 0.2\n",
    );
    let plain = write("options-plain.toml", "joint_sequence = true\n");
    // 8 training subjects at batch 2: 4 steps per epoch, so 6 steps cross an epoch (new
    // dropout keys) and validate once.
    let args = |cfg: &Path| -> Vec<String> {
        [
            "--stage",
            "mevp",
            "--steps",
            "6",
            "--config",
            cfg.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |out: &Path, cfg: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut a = args(cfg);
        a.extend(extra.iter().map(|s| s.to_string()));
        ok(&pretrain(
            out,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            env,
        ))
    };
    let straight = run_dir("options-straight");
    run(&straight, &all, &[], &[]);
    let resumed = run_dir("options-resumed");
    run(&resumed, &all, &[], &[("MTX_TEST_STOP_AFTER", "3")]);
    run(&resumed, &all, &["--resume", "auto"], &[]);
    assert_eq!(losses(&straight), losses(&resumed));
    assert_eq!(losses(&straight).len(), 6);
    assert!(
        final_state(&straight) == final_state(&resumed),
        "resumed run differs"
    );
    // The encoder changes every step: nothing to cache.
    assert!(!straight.join("mevp-cache").exists());

    let ckpt = Checkpoint::read(&straight.join("final.h5")).unwrap();
    let layout = Layout::new(&ckpt.meta.model);
    let enc = layout.part_range(mtx_hpc::model::Part::Encoder);
    let initial = mtx_hpc::model::init::init_params(&layout, 0);
    let frozen_dir = run_dir("options-frozen");
    run(&frozen_dir, &frozen, &[], &[]);
    let (trained, kept) = (final_state(&straight).0, final_state(&frozen_dir).0);
    assert!(
        kept[enc.clone()] == initial[enc.clone()],
        "frozen encoder moved"
    );
    assert!(
        trained[enc.clone()] != initial[enc],
        "trainable encoder did not move"
    );
    // Step 1 starts from the same parameters: only dropout tells the losses apart.
    let plain_dir = run_dir("options-plain");
    run(&plain_dir, &plain, &[], &[]);
    let first = |d: &Path| losses(d)[0].clone();
    assert_ne!(
        first(&frozen_dir),
        first(&plain_dir),
        "dropout changed nothing"
    );
}

/// (name, inode, modification time, length) of every file in a folder, sorted.
fn snapshot(dir: &Path) -> Vec<(String, u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.ino(),
                m.modified().unwrap(),
                m.len(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The MEVP target cache is a folder of the run, keyed by corpus and encoder, with one file
/// per training and validation subject after an epoch; a resumed run reads those files and
/// computes (so writes) none; and runs that must not cache leave no folder.
#[test]
fn the_mevp_cache_is_on_disk_and_a_resumed_run_reads_it() {
    let cfg = corpus().parent().unwrap().join("disk-cache.toml");
    std::fs::write(&cfg, "checkpoint_every = 1\n").unwrap();
    let args = [
        "--stage",
        "mevp",
        "--steps",
        "8",
        "--config",
        cfg.to_str().unwrap(),
    ];
    let dir = run_dir("disk-cache");
    // One epoch (4 steps of 8 training subjects at batch 2), then its validation.
    ok(&pretrain(&dir, &args, &[("MTX_TEST_STOP_AFTER", "4")]));
    let root = dir.join("mevp-cache");
    let keys: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let corpus8 = &mtx_hpc::io::file_checksum(corpus()).unwrap()[..8];
    assert!(
        keys[0].starts_with(&format!("{corpus8}-")) && keys[0].len() == 17,
        "{keys:?}"
    );
    let folder = root.join(&keys[0]);
    let before = snapshot(&folder);
    let mut names: Vec<&str> = before.iter().map(|f| f.0.as_str()).collect();
    names.sort_by_key(|n| n.trim_end_matches(".bin").parse::<usize>().unwrap());
    let want: Vec<String> = (0..10).map(|s| format!("{s}.bin")).collect();
    assert_eq!(names, want, "one file per training and validation subject");

    // The second epoch and its validation, resumed: every target from the files.
    let text = ok(&pretrain(
        &dir,
        &[&args[..], &["--resume", "auto"]].concat(),
        &[],
    ));
    assert!(text.contains("resuming from"), "{text}");
    assert_eq!(
        snapshot(&folder),
        before,
        "the resumed run rewrote cache files"
    );
    let straight = run_dir("disk-cache-straight");
    ok(&pretrain(&straight, &args, &[]));
    assert_eq!(losses(&straight), losses(&dir));
    assert!(final_state(&straight) == final_state(&dir));

    let off = corpus().parent().unwrap().join("disk-cache-off.toml");
    std::fs::write(&off, "cache_targets = false\n").unwrap();
    let uncached = run_dir("disk-cache-off");
    ok(&pretrain(
        &uncached,
        &[
            "--stage",
            "mevp",
            "--steps",
            "1",
            "--config",
            off.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(!uncached.join("mevp-cache").exists());
}
