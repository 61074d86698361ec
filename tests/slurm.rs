//! jobs/pretrain.slurm on a real single-node Slurm (scripts/slurm.sh: slurmctld, slurmd and a
//! munged of its own, with a private SLURM_CONF, state and logs in a temporary folder).
//!
//! One #[test] runs the cases in sequence, so that Slurm starts once and no two MPI jobs of
//! this binary compete for the machine's cores:
//!   (a) a 2-task job runs the tiny preset to the end and leaves a complete final checkpoint;
//!   (b) the same job with another run name, sent SIGUSR1 the way `--signal=B:USR1@N` sends it
//!       (to the batch shell only: `scancel --signal=USR1 --batch`; the script's trap forwards
//!       it to the step), leaves a complete checkpoint and exits 75; resubmitted with the same
//!       run name it resumes and ends with exactly the parameters and Adam moments of (a);
//!   (c) jobs/eval_array.slurm as a job array over a grid file (all three tasks) fills every
//!       cell's folder with
//!       metrics.json, a cell that cannot run fails loudly (failed.txt, a failed array task,
//!       named by `mtx-hpc report --grid-file`), and the same array resubmitted after a
//!       cell's metrics.json was deleted reruns that cell only.
//!
//! Slurm that cannot start is a failure, never a skip. Root is needed (apt, munged as user
//! munge, slurmd); scripts/setup.sh installs the packages beforehand.
mod common;

use mtx_hpc::data::corpus::CorpusWriter;
use mtx_hpc::io::AtomicFile;
use mtx_hpc::model::Layout;
use mtx_hpc::train::Checkpoint;
use mtx_hpc::train::checkpoint::latest_complete;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Steps per stage; both stages run (the continuation crosses the triplet -> MEVP boundary).
const STEPS: u64 = 10;
/// Longest a job of this test may take from submission to its end.
const JOB_LIMIT: Duration = Duration::from_secs(180);

/// A running private Slurm; stopped when dropped (also when a case panics), before its
/// folder is removed.
struct Slurm {
    conf: PathBuf,
    dir: tempfile::TempDir,
}

impl Slurm {
    fn start() -> Slurm {
        let dir = tempfile::Builder::new()
            .prefix("mtx-slurm-")
            .tempdir()
            .expect("temporary folder");
        let slurm = Slurm {
            conf: dir.path().join("slurm.conf"),
            dir,
        };
        let out = slurm.script("start");
        assert!(
            out.status.success(),
            "scripts/slurm.sh could not start Slurm (root and the Debian packages slurmctld, \
             slurmd, slurm-client and munge are needed; scripts/setup.sh installs them):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        slurm
    }

    fn script(&self, what: &str) -> Output {
        Command::new("bash")
            .arg(Path::new(ROOT).join("scripts/slurm.sh"))
            .args([what, self.dir.path().to_str().unwrap()])
            .output()
            .expect("cannot run scripts/slurm.sh")
    }

    /// A Slurm client command pointed at this instance.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["log/slurmctld.log", "log/slurmd.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s += &format!("--- {f}\n");
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let out = self.script("stop");
        if !out.status.success() {
            eprintln!(
                "scripts/slurm.sh stop failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// How a job ended, from `scontrol show job`.
struct JobEnd {
    state: String,
    exit_code: String,
    output: String,
}

/// The test's files: the corpus, the runs folder and the job outputs.
struct Work {
    dir: PathBuf,
    corpus: PathBuf,
}

impl Work {
    fn run_dir(&self, name: &str) -> PathBuf {
        self.dir.join("runs").join(name)
    }

    /// Submits jobs/pretrain.slurm (2 tasks, 1 CPU each, tiny preset, no requeue) for run
    /// `name`; returns the job id.
    fn submit(&self, slurm: &Slurm, name: &str) -> String {
        let out = slurm
            .cmd("sbatch")
            .current_dir(&self.dir)
            .args([
                "--parsable",
                "--job-name",
                name,
                "--nodes=1",
                "--ntasks-per-node=2",
                "--cpus-per-task=1",
                "--time=10",
                "--output",
            ])
            .arg(self.dir.join("job-%j.out"))
            .arg(Path::new(ROOT).join("jobs/pretrain.slurm"))
            .env("MTX_BIN", env!("CARGO_BIN_EXE_mtx-hpc"))
            .env("MTX_CORPUS", &self.corpus)
            .env("MTX_RUNS_DIR", self.dir.join("runs"))
            .env("MTX_RUN_NAME", name)
            .env("MTX_PRESET", "tiny")
            .env("MTX_STEPS", STEPS.to_string())
            .env("MTX_BATCH", "4")
            .env("MTX_STAGE", "all")
            // The continuation is a resubmission: a requeued job is held about 2 minutes
            // before it runs again, too long for a test. The requeue itself is one
            // `scontrol requeue` in the script.
            .env("MTX_REQUEUE", "0")
            .output()
            .expect("cannot run sbatch");
        assert!(
            out.status.success(),
            "sbatch failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        assert!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
            "sbatch printed no job id: {text}"
        );
        id
    }

    fn output(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("job-{id}.out"))).unwrap_or_default()
    }

    /// Polls `scontrol show job` (sbatch --wait polls at 2, 10 and 42 s) until the job ends.
    fn wait(&self, slurm: &Slurm, id: &str) -> JobEnd {
        let t0 = Instant::now();
        loop {
            let (state, exit_code) = job_state(slurm, id);
            let state = state.unwrap_or_else(|| {
                panic!(
                    "job {id} vanished from slurmctld before its end was seen\n{}\n{}",
                    self.output(id),
                    slurm.logs()
                )
            });
            if ![
                "PENDING",
                "CONFIGURING",
                "RUNNING",
                "COMPLETING",
                "SUSPENDED",
            ]
            .contains(&state.as_str())
            {
                return JobEnd {
                    state,
                    exit_code,
                    output: self.output(id),
                };
            }
            if t0.elapsed() > JOB_LIMIT {
                let _ = slurm.cmd("scancel").arg(id).status();
                panic!(
                    "job {id} still {state} after {JOB_LIMIT:?}\n{}\n{}",
                    self.output(id),
                    slurm.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// JobState and ExitCode of a job (None when slurmctld no longer knows it).
fn job_state(slurm: &Slurm, id: &str) -> (Option<String>, String) {
    let out = slurm
        .cmd("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .expect("cannot run scontrol");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    (field("JobState="), field("ExitCode=").unwrap_or_default())
}

/// A tiny-preset corpus (32x38x32 at 6 mm) of 10 smooth synthetic subjects (8 training,
/// 2 validation), written in-process: milliseconds instead of synth + pack.
fn tiny_corpus(dir: &Path) -> PathBuf {
    let grid = [32, 38, 32];
    let path = dir.join("tiny.h5");
    let mut header = common::header(grid);
    header.params.spacing = 6.0;
    header.val_fraction = 0.2;
    let n = 10;
    let out = AtomicFile::new(&path, true).expect("atomic file");
    let mut w = CorpusWriter::create(out, &path, header, n).expect("create corpus");
    for k in 0..n {
        w.push(common::meta(k), &common::prepared(k, grid, false))
            .expect("push subject");
    }
    w.finish().expect("finish corpus")
}

/// Loss, learning rate and gradient norm per step of metrics.jsonl (the last line of a step
/// wins: an interrupted run may have logged a step that its continuation repeats).
fn losses(run: &Path) -> BTreeMap<u64, String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON metrics line");
            (
                v["step"].as_u64().expect("step"),
                format!(
                    "{} {} {} {}",
                    v["stage"], v["loss"], v["lr"], v["grad_norm"]
                ),
            )
        })
        .collect()
}

/// Parameters, first and second Adam moments of a checkpoint, which must be complete.
fn state(path: &Path) -> (Checkpoint, Layout, [Vec<f32>; 3]) {
    let ckpt = Checkpoint::read(path)
        .unwrap_or_else(|e| panic!("{}: not a complete checkpoint: {e:#}", path.display()));
    let layout = Layout::new(&ckpt.meta.model);
    let params = ckpt.read_params(&layout).expect("parameters");
    let (m, v) = ckpt
        .read_moments(&layout)
        .expect("moments")
        .expect("the checkpoint holds Adam moments");
    (ckpt, layout, [params, m, v])
}

fn assert_ok(end: &JobEnd, what: &str) {
    assert!(
        end.state == "COMPLETED" && end.exit_code == "0:0",
        "{what}: job ended {} with exit code {}:\n{}",
        end.state,
        end.exit_code,
        end.output
    );
}

/// The 2 tasks ran as one MPI world: rank 0 alone reports (one "done"), and the metrics carry
/// the all-reduce timings that only MPI runs write.
fn assert_one_world(run: &Path, output: &str) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            v.get("comm_s").is_some(),
            "{}: a line without comm_s (did the 2 tasks run as 2 separate single-rank runs?): {l}",
            run.display()
        );
    }
    assert!(
        output.matches("done: step").count() <= 1,
        "more than one rank reported the end:\n{output}"
    );
}

/// Case (a): an uninterrupted 2-task run to the end.
fn straight_run(slurm: &Slurm, work: &Work) {
    let t0 = Instant::now();
    let id = work.submit(slurm, "straight");
    let end = work.wait(slurm, &id);
    assert_ok(&end, "uninterrupted run");
    let run = work.run_dir("straight");
    assert!(end.output.contains("finished:"), "{}", end.output);
    let (ckpt, _, _) = state(&run.join("final.h5"));
    assert_eq!(
        ckpt.meta.step,
        2 * STEPS,
        "final.h5 is not at the last step"
    );
    assert_eq!(
        latest_complete(&run)
            .unwrap()
            .map(|p| Checkpoint::read(&p).unwrap().meta.step),
        Some(2 * STEPS)
    );
    assert_eq!(losses(&run).len() as u64, 2 * STEPS);
    assert_one_world(&run, &end.output);
    eprintln!(
        "(a) 2-task job to the end: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Case (b): USR1 to the batch shell mid-run, then a resubmission with the same run name.
fn signalled_and_resumed(slurm: &Slurm, work: &Work) {
    let t0 = Instant::now();
    let run = work.run_dir("signalled");
    let id = work.submit(slurm, "signalled");
    // Signal once a few steps are logged: the run is past its start-up and has its handler.
    let metrics = run.join("metrics.jsonl");
    let seen = Instant::now();
    loop {
        let lines = std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
        if lines >= 3 {
            break;
        }
        let (state, _) = job_state(slurm, &id);
        assert!(
            matches!(
                state.as_deref(),
                Some("PENDING" | "RUNNING" | "CONFIGURING")
            ),
            "job {id} ended ({state:?}) before it logged 3 steps:\n{}",
            work.output(&id)
        );
        assert!(
            seen.elapsed() < JOB_LIMIT,
            "job {id} logged no 3 steps in {JOB_LIMIT:?}:\n{}",
            work.output(&id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What `#SBATCH --signal=B:USR1@120` does before the time limit: the signal reaches the
    // batch shell only (ENVIRONMENT.md: --batch = the shell; --full = the shell and its
    // children; plain = the steps). The script's trap forwards it to srun, srun to the ranks.
    let out = slurm
        .cmd("scancel")
        .args(["--signal=USR1", "--batch", &id])
        .output()
        .expect("cannot run scancel");
    assert!(
        out.status.success(),
        "scancel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = work.wait(slurm, &id);
    assert!(
        end.exit_code == "75:0",
        "the signalled job should exit 75 (checkpoint written, stopped), got {} {}:\n{}",
        end.state,
        end.exit_code,
        end.output
    );
    assert!(end.output.contains("SIGUSR1 received"), "{}", end.output);
    assert!(
        !run.join("final.h5").exists(),
        "the signalled run went to the end: signal it earlier"
    );
    let last = latest_complete(&run)
        .unwrap()
        .expect("no complete checkpoint after the signal");
    let (ckpt, _, _) = state(&last);
    let stopped_at = ckpt.meta.step;
    assert!(
        (3..2 * STEPS).contains(&stopped_at),
        "stopped at step {stopped_at}"
    );
    eprintln!(
        "(b) signalled job: stopped at step {stopped_at} with status 75 in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The continuation: a new job with the same run name finds the checkpoint.
    let t1 = Instant::now();
    let id = work.submit(slurm, "signalled");
    let end = work.wait(slurm, &id);
    assert_ok(&end, "continuation");
    assert!(
        end.output.contains("resuming from"),
        "the continuation did not resume:\n{}",
        end.output
    );
    assert_one_world(&run, &end.output);
    eprintln!(
        "(b) continuation from step {stopped_at}: {:.1} s",
        t1.elapsed().as_secs_f64()
    );

    // Same binary, backend, world size (2) and threads per rank (1) as (a): the design
    // promises a bit-identical result (fixed reduction order, keyed random draws), so every
    // tensor of the parameters and both Adam moments must be equal bit for bit, not merely
    // within a tolerance; a mismatch names the tensor and its largest relative difference.
    let straight = work.run_dir("straight");
    assert_eq!(losses(&straight), losses(&run), "loss curves differ");
    let (a_ckpt, layout, a) = state(&straight.join("final.h5"));
    let (b_ckpt, _, b) = state(&run.join("final.h5"));
    assert_eq!(a_ckpt.meta.step, b_ckpt.meta.step);
    for (what, (x, y)) in ["parameters", "Adam m", "Adam v"]
        .iter()
        .zip(a.iter().zip(b.iter()))
    {
        for e in layout.entries() {
            let (p, q) = (&x[e.range()], &y[e.range()]);
            let same = p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits());
            let worst = p
                .iter()
                .zip(q)
                .map(|(u, v)| ((u - v).abs() / u.abs().max(v.abs()).max(1e-30)) as f64)
                .fold(0.0, f64::max);
            assert!(
                same,
                "{what} {}: the resumed run differs from the uninterrupted one (largest \
                 relative difference {worst:e})",
                e.name
            );
        }
    }
}

/// Waits until no task of array job `id` is left in the queue.
fn wait_array(slurm: &Slurm, id: &str) {
    let t0 = Instant::now();
    loop {
        let out = slurm
            .cmd("squeue")
            .args(["-h", "-r", "-j", id, "-o", "%i %T"])
            .output()
            .expect("cannot run squeue");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.trim().is_empty() {
            return;
        }
        if t0.elapsed() > JOB_LIMIT {
            let _ = slurm.cmd("scancel").arg(id).status();
            panic!(
                "array job {id} still queued after {JOB_LIMIT:?}:\n{text}\n{}",
                slurm.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// (c): the evaluation grid as a job array.
fn eval_array(slurm: &Slurm, work: &Work) {
    let t0 = Instant::now();
    let dir = work.dir.join("eval-array");
    std::fs::create_dir_all(&dir).unwrap();
    // 16 subjects: diagnosis CN/AD on a half of them, ages on all but one.
    let corpus = dir.join("clinical.h5");
    let out = AtomicFile::new(&corpus, true).expect("atomic file");
    let mut header = common::header([32, 38, 32]);
    header.params.spacing = 6.0;
    let mut w = CorpusWriter::create(out, &corpus, header, 16).expect("create corpus");
    for k in 0..16 {
        // Tumour labels on the odd subjects.
        w.push(
            common::meta(k),
            &common::prepared(k, [32, 38, 32], k % 2 == 1),
        )
        .expect("push subject");
    }
    w.finish().expect("finish corpus");
    let ckpt = common::pretraining_checkpoint(&dir, mtx_hpc::model::Preset::Tiny);
    let grid = dir.join("grid.txt");
    std::fs::write(
        &grid,
        "# task fold fraction init seed\n\
         diagnosis 0 1 pretrained 0\n\
         diagnosis 1 1 scratch 0\n\
         age 0 0.5 pretrained 0\n\
         age 1 1 scratch 0\n\
         segmentation 0 1 pretrained 0\n\
         age 7 1 scratch 0   # fold 7 of 2: fails\n",
    )
    .unwrap();
    let eval = dir.join("eval");
    let submit = || {
        let out = slurm
            .cmd("sbatch")
            .current_dir(&dir)
            .args([
                "--parsable",
                "--array=0-5",
                "--cpus-per-task=1",
                "--time=10",
                "--output",
            ])
            .arg(dir.join("arr-%A_%a.out"))
            .arg(Path::new(ROOT).join("jobs/eval_array.slurm"))
            .env("MTX_BIN", env!("CARGO_BIN_EXE_mtx-hpc"))
            .env("MTX_CORPUS", &corpus)
            .env("MTX_CHECKPOINT", &ckpt)
            .env("MTX_GRID", &grid)
            .env("MTX_EVAL_DIR", &eval)
            .env("MTX_FOLDS", "2")
            .env("MTX_EPOCHS", "1")
            .output()
            .expect("cannot run sbatch");
        assert!(
            out.status.success(),
            "sbatch failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .to_string();
        wait_array(slurm, &id);
        let outputs: Vec<String> = (0..6)
            .map(|a| {
                std::fs::read_to_string(dir.join(format!("arr-{id}_{a}.out")))
                    .unwrap_or_else(|e| panic!("array task {a}: no output: {e}"))
            })
            .collect();
        outputs
    };
    let cell_dirs = [
        "diagnosis/fraction-1/pretrained/fold-0-seed-0",
        "diagnosis/fraction-1/scratch/fold-1-seed-0",
        "age/fraction-0.5/pretrained/fold-0-seed-0",
        "age/fraction-1/scratch/fold-1-seed-0",
        "segmentation/fraction-1/pretrained/fold-0-seed-0",
        "age/fraction-1/scratch/fold-7-seed-0",
    ]
    .map(|d| eval.join(d));
    let first = submit();
    eprintln!(
        "eval array: first submission {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for (c, out) in first.iter().enumerate().take(5) {
        assert!(
            cell_dirs[c].join("metrics.json").is_file()
                && cell_dirs[c].join("predictions.csv").is_file()
                && cell_dirs[c].join("finetuned.h5").is_file(),
            "cell {c}: no finished run in {}:\n{out}",
            cell_dirs[c].display()
        );
        assert!(out.contains(&format!("cell {c} done")), "cell {c}:\n{out}");
    }
    let failed = cell_dirs[5].join("failed.txt");
    let text = std::fs::read_to_string(&failed).unwrap_or_else(|_| {
        panic!(
            "cell 5 should have failed and left failed.txt:\n{}",
            first[5]
        )
    });
    assert!(text.starts_with("age 7 1 scratch 0\n"), "{text}");
    assert!(text.contains("fold 7 is out of range"), "{text}");
    assert!(first[5].contains("cell 5 FAILED"), "{}", first[5]);
    // The report names the failed cell.
    let report = dir.join("report");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .arg("report")
        .arg(&eval)
        .arg("--grid-file")
        .arg(&grid)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("fold 7 is out of range"), "{md}");

    // Resubmitted after one cell's metrics.json is gone: only that cell runs again.
    let stamp = |c: usize| {
        std::fs::metadata(cell_dirs[c].join("finetuned.h5"))
            .and_then(|m| m.modified())
            .unwrap()
    };
    let before: Vec<_> = (0..5).map(stamp).collect();
    std::fs::remove_file(cell_dirs[2].join("metrics.json")).unwrap();
    let second = submit();
    for c in [0, 1, 3, 4] {
        assert!(second[c].contains("skipped"), "cell {c}:\n{}", second[c]);
        assert_eq!(stamp(c), before[c], "cell {c} was rerun");
    }
    assert!(second[2].contains("cell 2 done"), "{}", second[2]);
    assert!(cell_dirs[2].join("metrics.json").is_file());
    assert_ne!(stamp(2), before[2], "cell 2 was not rerun");
    eprintln!(
        "eval array: both submissions {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn jobs_on_a_real_slurm() {
    let t0 = Instant::now();
    let slurm = Slurm::start();
    eprintln!("Slurm up in {:.1} s", t0.elapsed().as_secs_f64());
    let tmp = tempfile::Builder::new()
        .prefix("mtx-slurm-work-")
        .tempdir()
        .expect("temporary folder");
    let work = Work {
        dir: tmp.path().to_path_buf(),
        corpus: tiny_corpus(tmp.path()),
    };
    straight_run(&slurm, &work);
    signalled_and_resumed(&slurm, &work);
    eval_array(&slurm, &work);
    drop(slurm);
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
}
