//! `mtx-hpc pretrain` under `mpirun` on a tiny corpus: N ranks equal one rank, the per-rank
//! batch is checked, and every kind of rank fault ends the whole job within seconds, naming
//! the rank where it can and leaving the last complete checkpoint intact. MPI tests run one
//! at a time (a lock), each with a deadline so a hang fails instead of blocking CI.
mod common;

use mtx_hpc::model::Layout;
use mtx_hpc::train::{Checkpoint, checkpoint};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny-preset corpus of 12 synthetic subjects (about 10 train, 2 validation), made once.
fn corpus() -> &'static Path {
    static C: OnceLock<PathBuf> = OnceLock::new();
    C.get_or_init(|| {
        let dir = common::shared_dir("mpi");
        common::tiny_corpus(&dir, 12, 1)
    })
}

fn run_dir(name: &str) -> PathBuf {
    let d = corpus().parent().unwrap().join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `mpirun -n N mtx-hpc pretrain --corpus C --out OUT --preset tiny ARGS` (N = 0: no mpirun).
fn command(n: usize, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let bin = env!("CARGO_BIN_EXE_mtx-hpc");
    let mut cmd = if n == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-n", &n.to_string(), "--oversubscribe", bin]);
        c
    };
    cmd.args(["pretrain", "--corpus"])
        .arg(corpus())
        .arg("--out")
        .arg(out)
        .args(["--preset", "tiny", "--threads", "1"])
        .args(args)
        // OpenMPI refuses root without these (ENVIRONMENT.md); harmless otherwise.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Waits for `child` at most `limit`; a hang kills it and fails the test.
fn finish(mut child: Child, limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), t.elapsed());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "no exit within {limit:?} (hang): {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(n: usize, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = command(n, out, args, env).spawn().expect("start mpirun");
    finish(child, Duration::from_secs(300)).0
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", text(o));
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Largest relative difference ||a - b|| / ||b|| over the layout's tensors, and its name.
fn largest_difference(a: &Path, b: &Path) -> (f64, String) {
    let (ca, cb) = (Checkpoint::read(a).unwrap(), Checkpoint::read(b).unwrap());
    let layout = Layout::new(&ca.meta.model);
    let (pa, pb) = (
        ca.read_params(&layout).unwrap(),
        cb.read_params(&layout).unwrap(),
    );
    let mut worst = (0.0, String::new());
    for e in layout.iter() {
        // Two biases have an exactly zero true gradient, so they hold Adam-scaled rounding
        // noise (on one rank as on many) and no tolerance is meaningful for them: the key
        // bias adds the same score to every key of a query, which softmax ignores; the
        // encoder's output bias moves anchor, positive and negative alike, which the triplet
        // distances ignore.
        if e.name.ends_with("attn.k.bias") || e.name == "encoder.fc.bias" {
            continue;
        }
        let r = e.range();
        let diff: f64 = pa[r.clone()]
            .iter()
            .zip(&pb[r.clone()])
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = pb[r]
            .iter()
            .map(|y| f64::from(*y).powi(2))
            .sum::<f64>()
            .sqrt();
        let rel = diff / norm.max(1e-30);
        if rel > worst.0 {
            worst = (rel, e.name.clone());
        }
    }
    worst
}

#[test]
fn two_and_three_ranks_equal_one() {
    let _g = serial();
    // MEVP from the same initial encoder: 10 steps of the global batch, the gradient summed
    // in 4 KiB buckets (about 13 for the tiny transformer) so most leave during backward.
    let cfg = corpus().parent().unwrap().join("small-buckets.toml");
    std::fs::write(&cfg, "allreduce_bucket_kb = 4\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let common_args = ["--stage", "mevp", "--steps", "10", "--config", cfg];
    let one = run_dir("eq-1");
    ok(&run(
        0,
        &one,
        &[&common_args[..], &["--batch", "4"]].concat(),
        &[],
    ));
    let two = run_dir("eq-2");
    let o = run(
        2,
        &two,
        &[&common_args[..], &["--batch", "4"]].concat(),
        &[],
    );
    ok(&o);
    // On the CPU, auto sums through MPI from host copies, and says so without a notice.
    let t = text(&o);
    assert!(
        t.contains("gradients: summed over 2 ranks by MPI from host copies"),
        "{t}"
    );
    assert!(!t.contains("--grad-comm auto:"), "{t}");
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 10);
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "loss curves differ: {l1:?} vs {l2:?}"
        );
    }
    let early: Vec<u64> = std::fs::read_to_string(two.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["comm_buckets_early"].as_u64().unwrap()
        })
        .collect();
    assert!(
        early.iter().all(|&e| e >= 5),
        "buckets sent during backward: {early:?}"
    );
    let (worst, name) = largest_difference(&two.join("final.h5"), &one.join("final.h5"));
    eprintln!("2 vs 1 rank after 10 MEVP steps: largest relative difference {worst:.2e} ({name})");
    assert!(worst < 1e-5, "{name}: {worst}");

    let one6 = run_dir("eq-1b6");
    ok(&run(
        0,
        &one6,
        &[&common_args[..], &["--batch", "6"]].concat(),
        &[],
    ));
    let three = run_dir("eq-3");
    ok(&run(
        3,
        &three,
        &[&common_args[..], &["--batch", "6"]].concat(),
        &[],
    ));
    let (worst, name) = largest_difference(&three.join("final.h5"), &one6.join("final.h5"));
    eprintln!("3 vs 1 rank after 10 MEVP steps: largest relative difference {worst:.2e} ({name})");
    assert!(worst < 1e-5, "{name}: {worst}");

    // A trainable encoder in MEVP: its gradient is final only after the last encoder pass,
    // which follows the transformer's. Sending 4 KiB buckets as backward goes must give
    // exactly what one bucket sent after backward gives.
    let trainable = |kb: usize| {
        let cfg = corpus()
            .parent()
            .unwrap()
            .join(format!("trainable-{kb}.toml"));
        let text = format!("allreduce_bucket_kb = {kb}\ntrainable_encoder_in_mevp = true\n");
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let (small, whole) = (trainable(4), trainable(1 << 20));
    let targs = [
        "--stage", "mevp", "--steps", "4", "--batch", "4", "--config",
    ];
    let run_t = |n: usize, name: &str, cfg: &Path| {
        let out = run_dir(name);
        ok(&run(
            n,
            &out,
            &[&targs[..], &[cfg.to_str().unwrap()]].concat(),
            &[],
        ));
        out
    };
    let (tr_small, tr_whole) = (run_t(2, "eq-tr2", &small), run_t(2, "eq-tr2w", &whole));
    let (worst, name) = largest_difference(&tr_small.join("final.h5"), &tr_whole.join("final.h5"));
    assert_eq!(worst, 0.0, "{name}: early buckets changed the result");
    // Against one rank: blank slices are inputs here, and instance norm over their near-zero
    // maps amplifies last-bit differences (docs/ARCHITECTURE.md), hence the looser bound.
    let tr1 = run_t(0, "eq-tr1", &small);
    let (worst, name) = largest_difference(&tr_small.join("final.h5"), &tr1.join("final.h5"));
    eprintln!(
        "2 vs 1 rank after 4 trainable MEVP steps: largest relative difference {worst:.2e} ({name})"
    );
    assert!(worst < 1e-4, "{name}: {worst}");

    // The triplet stage's first step sees the same batch and gradient on 1 and 2 ranks.
    let t1 = run_dir("eq-t1");
    ok(&run(
        0,
        &t1,
        &["--stage", "triplet", "--steps", "1", "--batch", "4"],
        &[],
    ));
    let t2 = run_dir("eq-t2");
    ok(&run(
        2,
        &t2,
        &["--stage", "triplet", "--steps", "1", "--batch", "4"],
        &[],
    ));
    let (a, b) = (losses(&t1)[0], losses(&t2)[0]);
    assert!((a - b).abs() <= 1e-6 * a, "{a} vs {b}");
    let (worst, name) = largest_difference(&t2.join("final.h5"), &t1.join("final.h5"));
    eprintln!("2 vs 1 rank after 1 triplet step: largest relative difference {worst:.2e} ({name})");
    assert!(worst < 1e-5, "{name}: {worst}");
}

#[test]
fn odd_or_empty_per_rank_batches_are_refused() {
    let _g = serial();
    let out = run_dir("odd");
    let o = run(2, &out, &["--batch", "2", "--steps", "1"], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("1 subjects per rank: it must be even"),
        "{}",
        text(&o)
    );
    let o = run(3, &out, &["--batch", "4", "--steps", "1"], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not divisible by the 3 ranks"),
        "{}",
        text(&o)
    );
}

#[test]
fn nccl_on_cpu_ranks_is_refused_by_every_rank_together() {
    let _g = serial();
    let out = run_dir("nccl-cpu");
    let child = command(
        2,
        &out,
        &[
            "--steps",
            "1",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--grad-comm",
            "nccl",
        ],
        &[],
    )
    .spawn()
    .expect("start mpirun");
    let (o, took) = finish(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    let why = if cfg!(feature = "nccl") {
        "ranks 0 and 1 of 2 compute on the CPU"
    } else {
        "built without the `nccl` feature"
    };
    assert!(t.contains("error: --grad-comm nccl: "), "{t}");
    assert!(t.contains(why), "{t}");
    // A collective refusal: rank 0 says it once, nobody aborts.
    assert_eq!(t.matches("--grad-comm nccl:").count(), 1, "{t}");
    assert!(!t.contains("MPI_ABORT"), "{t}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn a_launcher_mpi_mismatch_is_explained() {
    let _g = serial();
    // What a binary of another MPI sees under mpirun: the launcher says 2, MPI says 1.
    let out = run_dir("mismatch");
    let o = run(
        0,
        &out,
        &["--steps", "1", "--batch", "4"],
        &[("OMPI_COMM_WORLD_SIZE", "2")],
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("OMPI_COMM_WORLD_SIZE=2") && t.contains("world of 1"),
        "{t}"
    );
}

/// Runs a 2-rank job with a fault hook on rank 1; it must end within seconds, non-zero.
fn faulty(name: &str, env: &[(&str, &str)], needles: &[&str]) -> PathBuf {
    let out = run_dir(name);
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, "checkpoint_every = 1\n").unwrap();
    let mut all_env = vec![("MTX_TEST_RANK", "1")];
    all_env.extend_from_slice(env);
    let args = [
        "--batch", "4", "--steps", "6", "--stage", "triplet", "--config",
    ];
    let child = command(2, &out, &args, &all_env).arg(&cfg).spawn().unwrap();
    let (o, took) = finish(child, Duration::from_secs(120));
    assert!(!o.status.success(), "{}", text(&o));
    for n in needles {
        assert!(text(&o).contains(n), "missing '{n}' in:\n{}", text(&o));
    }
    eprintln!("{name}: ended in {took:?}");
    out
}

#[test]
fn a_fault_on_one_rank_ends_the_job_and_keeps_the_checkpoint() {
    let _g = serial();
    // A NaN on rank 1 at step 3: decided collectively, named, checkpoint 2 intact.
    let out = faulty(
        "nan1",
        &[("MTX_TEST_NAN_AT_STEP", "3")],
        &["step 3", "on rank 1", "ckpt-step00000002.h5"],
    );
    assert_eq!(
        Checkpoint::read(&out.join("ckpt-step00000002.h5"))
            .unwrap()
            .meta
            .step,
        2
    );
    assert!(!out.join("ckpt-step00000003.h5").exists());

    // An error on rank 1 alone (the others wait in a collective): MPI_Abort ends the job.
    let out = faulty(
        "fail1",
        &[("MTX_TEST_FAIL_AT_STEP", "4")],
        &["error on rank 1 of 2", "step 4: failure injected"],
    );
    let last = checkpoint::latest_complete(&out).unwrap().unwrap();
    assert_eq!(Checkpoint::read(&last).unwrap().meta.step, 3);

    // A subject rank 1 cannot read: its first batch holds it or a later one does.
    let c = mtx_hpc::data::corpus::Corpus::open(corpus()).unwrap();
    let victim = c.train_indices()[0].to_string();
    faulty(
        "unreadable",
        &[("MTX_TEST_UNREADABLE_SUBJECT", &victim)],
        &["error on rank", &format!("(index {victim}) cannot be read")],
    );
}

#[test]
fn a_killed_rank_ends_the_job_within_seconds() {
    let _g = serial();
    let out = run_dir("sigkill");
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, "checkpoint_every = 2\n").unwrap();
    let mut child = command(
        2,
        &out,
        &[
            "--batch", "4", "--steps", "100000", "--stage", "triplet", "--config",
        ],
        &[],
    )
    .arg(&cfg)
    .spawn()
    .unwrap();
    // Wait for a checkpoint, then SIGKILL one rank (a child of mpirun).
    let t = Instant::now();
    while checkpoint::latest_complete(&out).ok().flatten().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kids = Command::new("pgrep")
        .args(["-P", &child.id().to_string()])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&kids.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(pids.len(), 2, "expected 2 ranks under mpirun: {pids:?}");
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", &pids[1]])
            .status()
            .unwrap()
            .success()
    );
    let limit = Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if killed.elapsed() > limit {
            let _ = child.kill();
            panic!("mpirun still running {limit:?} after a rank was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    eprintln!(
        "mpirun ended {:?} after SIGKILL of a rank, status {:?}",
        killed.elapsed(),
        o.status.code()
    );
    assert!(!o.status.success());
    let last = checkpoint::latest_complete(&out).unwrap().unwrap();
    Checkpoint::read(&last).unwrap();
}

#[test]
fn a_signal_checkpoints_exits_75_and_resumes_exactly() {
    let _g = serial();
    let args = ["--batch", "4", "--steps", "40", "--stage", "triplet"];
    let straight = run_dir("sig-straight");
    ok(&run(2, &straight, &args, &[]));

    let out = run_dir("sig");
    let mut child = command(2, &out, &args, &[]).spawn().unwrap();
    // Signal mpirun (it forwards SIGUSR1 to the ranks) once training is under way.
    let t = Instant::now();
    while !out.join("metrics.jsonl").exists()
        || std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            < 3
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        if child.try_wait().unwrap().is_some() {
            panic!("finished before the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        Command::new("kill")
            .args(["-USR1", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (o, _) = finish(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    assert!(text(&o).contains("--resume auto"), "{}", text(&o));
    let last = checkpoint::latest_complete(&out).unwrap().unwrap();
    let stopped_at = Checkpoint::read(&last).unwrap().meta.step;
    assert!(stopped_at < 40, "stopped at {stopped_at}");

    ok(&run(
        2,
        &out,
        &[&args[..], &["--resume", "auto"]].concat(),
        &[],
    ));
    let (worst, name) = largest_difference(&out.join("final.h5"), &straight.join("final.h5"));
    assert_eq!(
        worst, 0.0,
        "{name} differs after resume from step {stopped_at}"
    );
    assert_eq!(losses(&out), losses(&straight));
}

#[test]
fn the_corpus_is_staged_once_per_node() {
    let _g = serial();
    let stage = corpus().parent().unwrap().join("node-local");
    let _ = std::fs::remove_dir_all(&stage);
    let args = [
        "--batch",
        "4",
        "--steps",
        "2",
        "--stage",
        "triplet",
        "--stage-corpus",
        stage.to_str().unwrap(),
    ];
    let out = run_dir("staged");
    let o = run(2, &out, &args, &[]);
    ok(&o);
    // Local rank 0 copied it, once; the copy is the same file.
    assert_eq!(text(&o).matches("staged ").count(), 1, "{}", text(&o));
    let copy = stage.join(corpus().file_name().unwrap());
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(corpus()).unwrap()
    );
    // A second run finds the copy up to date and does not copy again.
    let o = run(2, &run_dir("staged-again"), &args, &[]);
    ok(&o);
    assert!(!text(&o).contains("staged "), "{}", text(&o));
}
