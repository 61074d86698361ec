//! `mtx-hpc bench scaling`: weak or strong scaling of data-parallel pretraining. Launches one
//! `mtx-hpc pretrain` run per rank count (mpirun, or srun inside an allocation), reads each
//! run's metrics.jsonl after the warm-up steps and writes DIR/scaling.csv and DIR/scaling.svg
//! (throughput and efficiency against ranks), for docs/PERFORMANCE.md.
//!
//! Efficiency is throughput per rank relative to the smallest rank count measured:
//! `(thr(R) / R) / (thr(R0) / R0)`. For weak scaling (per-rank batch fixed) that is the usual
//! weak efficiency; for strong scaling (global batch fixed, so thr = batch / step time) it is
//! `T(R0) R0 / (T(R) R)`, the usual strong efficiency.
use crate::data::corpus::{Corpus, val_count};
use crate::model::{ModelConfig, Preset};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Per-rank batch fixed: the global batch grows with the ranks (R x --batch).
    Weak,
    /// Global batch fixed (--batch), split over the ranks.
    Strong,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Weak => "weak",
            Mode::Strong => "strong",
        }
    }

    /// The global batch of a run with `ranks` ranks.
    pub fn global_batch(self, ranks: usize, batch: usize) -> usize {
        match self {
            Mode::Weak => ranks * batch,
            Mode::Strong => batch,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `mpirun -n R` (OpenMPI; oversubscribes when R x threads exceeds the cores).
    Mpirun,
    /// `srun --mpi=pmix -n R` inside a Slurm allocation (jobs/scaling.slurm).
    Srun,
}

/// Weak or strong scaling of pretraining over MPI ranks.
#[derive(clap::Args, Debug, Clone)]
#[command(
    long_about = "Weak or strong scaling of data-parallel pretraining. For each rank count R, \
runs `mtx-hpc pretrain` with R MPI ranks (mpirun -n R, or srun inside a Slurm allocation) for \
--steps steps of one stage, reads its metrics.jsonl after the warm-up steps, and writes \
OUT/scaling.csv (ranks, mode, global batch, subjects/s, efficiency, step time, all-reduce time, \
exposed all-reduce time, data wait) and OUT/scaling.svg (throughput and efficiency against \
ranks). Weak: each rank keeps --batch subjects, the global batch is R x --batch. Strong: the \
global batch stays --batch. Efficiency is throughput per rank relative to the smallest rank \
count. Without --corpus, a synthetic healthy corpus at the preset's grid is made in OUT once.",
    after_help = "Examples:\n  mtx-hpc bench scaling --ranks 1,2 --mode weak --preset paper --steps 6 --batch 2 --out bench/weak\n  \
mtx-hpc bench scaling --ranks 1,2 --mode strong --preset small --steps 8 --batch 4 --out bench/strong\n  \
sbatch jobs/scaling.slurm      (srun inside an allocation)"
)]
pub struct ScalingArgs {
    /// Rank counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub ranks: Vec<usize>,
    #[arg(long, value_enum, default_value_t = Mode::Weak)]
    pub mode: Mode,
    #[arg(long, value_enum, default_value_t = Preset::Paper)]
    pub preset: Preset,
    /// Steps per run, warm-up included.
    #[arg(long, default_value_t = 6)]
    pub steps: u64,
    /// Weak: subjects per rank; strong: the global batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// First steps of each run left out of the averages.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Stage to time: triplet (encoder forward + backward) or mevp.
    #[arg(long, default_value = "triplet", value_parser = ["triplet", "mevp"])]
    pub stage: String,
    /// Threads per rank (under srun, SLURM_CPUS_PER_TASK takes precedence).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Corpus to train on (default: a synthetic one made in OUT).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Output folder: scaling.csv, scaling.svg, one run folder and log per rank count.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Launcher::Mpirun)]
    pub launcher: Launcher,
}

/// Averages of one run over its measured (post-warm-up) steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub steps: usize,
    /// Mean wall time of a step (global batch / the step's subjects/s), seconds.
    pub step_s: f64,
    /// Global batch / mean step time.
    pub subjects_per_s: f64,
    /// Mean all-reduce time per step (absent from single-process runs).
    pub comm_s: Option<f64>,
    /// Mean all-reduce time per step not hidden behind backward.
    pub comm_exposed_s: Option<f64>,
    /// Mean of the slowest rank's wait for data per step.
    pub data_wait_s: Option<f64>,
}

/// One row of scaling.csv.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub ranks: usize,
    pub mode: &'static str,
    pub global_batch: usize,
    pub per_rank_batch: usize,
    pub subjects_per_s: f64,
    pub efficiency: f64,
    pub step_s: f64,
    pub comm_s: Option<f64>,
    pub comm_exposed_s: Option<f64>,
    pub data_wait_s: Option<f64>,
    pub steps_measured: usize,
}

/// Averages the steps of a metrics.jsonl after the first `warmup` steps.
pub fn summarize(metrics: &str, global_batch: usize, warmup: u64) -> Result<RunSummary> {
    let mut step_s = Vec::new();
    let (mut comm, mut exposed, mut wait) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in metrics.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("metrics.jsonl line {}: not JSON", i + 1))?;
        let step = v["step"]
            .as_u64()
            .with_context(|| format!("metrics.jsonl line {}: no step", i + 1))?;
        if step <= warmup {
            continue;
        }
        let sps = v["subjects_per_s"]
            .as_f64()
            .filter(|s| *s > 0.0)
            .with_context(|| format!("metrics.jsonl line {}: no positive subjects_per_s", i + 1))?;
        step_s.push(global_batch as f64 / sps);
        for (key, into) in [
            ("comm_s", &mut comm),
            ("comm_exposed_s", &mut exposed),
            ("data_wait_s", &mut wait),
        ] {
            if let Some(x) = v[key].as_f64() {
                into.push(x);
            }
        }
    }
    if step_s.is_empty() {
        bail!("no steps after the {warmup} warm-up steps: raise --steps above --warmup");
    }
    let n = step_s.len();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    // A field counts only when every measured step has it.
    let field = |xs: &[f64]| (xs.len() == n).then(|| mean(xs));
    let step = mean(&step_s);
    Ok(RunSummary {
        steps: n,
        step_s: step,
        subjects_per_s: global_batch as f64 / step,
        comm_s: field(&comm),
        comm_exposed_s: field(&exposed),
        data_wait_s: field(&wait),
    })
}

/// The rows of scaling.csv, in rank order, with efficiency relative to the fewest ranks.
pub fn rows(mode: Mode, batch: usize, runs: &[(usize, RunSummary)]) -> Vec<Row> {
    let mut runs = runs.to_vec();
    runs.sort_by_key(|(r, _)| *r);
    let Some((r0, s0)) = runs.first().cloned() else {
        return vec![];
    };
    let base = s0.subjects_per_s / r0 as f64;
    runs.into_iter()
        .map(|(r, s)| {
            let gb = mode.global_batch(r, batch);
            Row {
                ranks: r,
                mode: mode.name(),
                global_batch: gb,
                per_rank_batch: gb / r,
                subjects_per_s: s.subjects_per_s,
                efficiency: (s.subjects_per_s / r as f64) / base,
                step_s: s.step_s,
                comm_s: s.comm_s,
                comm_exposed_s: s.comm_exposed_s,
                data_wait_s: s.data_wait_s,
                steps_measured: s.steps,
            }
        })
        .collect()
}

pub fn csv(rows: &[Row]) -> Result<String> {
    let mut w = csv::Writer::from_writer(vec![]);
    for r in rows {
        w.serialize(r)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

/// Round tick values from 0 to at least `max`: steps of 1, 2 or 5 times a power of ten.
pub fn ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow);
    let n = (max / step - 1e-9).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

fn fmt_tick(x: f64) -> String {
    if x == x.round() {
        format!("{x:.0}")
    } else if (10.0 * x) == (10.0 * x).round() {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A small SVG: throughput (left axis, solid) and efficiency (right axis, dashed) against
/// ranks on a log2 axis; the ideal throughput (perfect efficiency) dotted.
pub fn svg(rows: &[Row], title: &str) -> String {
    let (w, h) = (640.0, 400.0);
    let (left, right, top, bottom) = (70.0, 570.0, 50.0, 340.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    if rows.is_empty() {
        s.push_str("</svg>\n");
        return s;
    }
    let lg: Vec<f64> = rows.iter().map(|r| (r.ranks as f64).log2()).collect();
    let (lo, hi) = (lg[0], lg[lg.len() - 1]);
    let x = |l: f64| {
        if hi > lo {
            left + (l - lo) / (hi - lo) * (right - left)
        } else {
            (left + right) / 2.0
        }
    };
    let base = rows[0].subjects_per_s / rows[0].ranks as f64;
    let ideal: Vec<f64> = rows.iter().map(|r| base * r.ranks as f64).collect();
    let thr_max = rows
        .iter()
        .map(|r| r.subjects_per_s)
        .chain(ideal.iter().copied())
        .fold(0.0, f64::max);
    let thr_ticks = ticks(thr_max);
    let thr_top = *thr_ticks.last().unwrap();
    let eff_max = rows.iter().map(|r| r.efficiency).fold(1.0, f64::max);
    let eff_ticks = ticks(eff_max * 100.0);
    let eff_top = *eff_ticks.last().unwrap();
    let y_thr = |v: f64| bottom - v / thr_top * (bottom - top);
    let y_eff = |v: f64| bottom - v * 100.0 / eff_top * (bottom - top);

    // Axes, grid and tick labels.
    let _ = writeln!(
        s,
        r##"<g stroke="#444" fill="none"><line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/><line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}"/><line x1="{right}" y1="{top}" x2="{right}" y2="{bottom}"/></g>"##
    );
    for t in &thr_ticks {
        let y = y_thr(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 6.0,
            y + 4.0,
            fmt_tick(*t)
        );
    }
    for t in &eff_ticks {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.1}" fill="#d95f02">{}%</text>"##,
            right + 6.0,
            bottom - t / eff_top * (bottom - top) + 4.0,
            fmt_tick(*t)
        );
    }
    for (r, l) in rows.iter().zip(&lg) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(*l),
            bottom + 18.0,
            r.ranks
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">MPI ranks</text>"#,
        (left + right) / 2.0,
        bottom + 40.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle" fill="#1b6ac9">subjects/s</text>"##,
        (top + bottom) / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(628 {}) rotate(90)" text-anchor="middle" fill="#d95f02">efficiency</text>"##,
        (top + bottom) / 2.0
    );

    // Series.
    let points = |ys: &[f64]| -> String {
        lg.iter()
            .zip(ys)
            .map(|(l, y)| format!("{:.1},{:.1}", x(*l), y))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let ideal_y: Vec<f64> = ideal.iter().map(|v| y_thr(*v)).collect();
    let thr_y: Vec<f64> = rows.iter().map(|r| y_thr(r.subjects_per_s)).collect();
    let eff_y: Vec<f64> = rows.iter().map(|r| y_eff(r.efficiency)).collect();
    let _ = writeln!(
        s,
        r##"<polyline class="ideal" points="{}" fill="none" stroke="#999" stroke-dasharray="2 4"/>"##,
        points(&ideal_y)
    );
    let _ = writeln!(
        s,
        r##"<polyline class="throughput" points="{}" fill="none" stroke="#1b6ac9" stroke-width="2"/>"##,
        points(&thr_y)
    );
    let _ = writeln!(
        s,
        r##"<polyline class="efficiency" points="{}" fill="none" stroke="#d95f02" stroke-width="2" stroke-dasharray="6 4"/>"##,
        points(&eff_y)
    );
    for ((l, ty), ey) in lg.iter().zip(&thr_y).zip(&eff_y) {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{ty:.1}" r="4" fill="#1b6ac9"/><circle cx="{:.1}" cy="{ey:.1}" r="4" fill="#d95f02"/>"##,
            x(*l),
            x(*l)
        );
    }
    // Legend.
    let _ = writeln!(
        s,
        r##"<g transform="translate({} {})"><line x1="0" y1="0" x2="24" y2="0" stroke="#1b6ac9" stroke-width="2"/><text x="30" y="4">subjects/s</text><line x1="110" y1="0" x2="134" y2="0" stroke="#d95f02" stroke-width="2" stroke-dasharray="6 4"/><text x="140" y="4">efficiency</text><line x1="220" y1="0" x2="244" y2="0" stroke="#999" stroke-dasharray="2 4"/><text x="250" y="4">ideal subjects/s</text></g>"##,
        left + 10.0,
        top - 14.0
    );
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_opt(x: Option<f64>, scale: f64) -> String {
    x.map_or("-".into(), |v| format!("{:.1}", v * scale))
}

/// The command that runs `mtx-hpc pretrain` on `ranks` ranks.
fn launch(args: &ScalingArgs, ranks: usize) -> Command {
    match args.launcher {
        Launcher::Mpirun => {
            let mut c = Command::new("mpirun");
            c.args(["-n", &ranks.to_string(), "--bind-to", "none"]);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if ranks * args.threads > cores {
                c.arg("--oversubscribe");
            }
            // OpenMPI refuses root without these (ENVIRONMENT.md); they change nothing else.
            c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
            c
        }
        Launcher::Srun => {
            let mut c = Command::new("srun");
            c.args([
                "--mpi=pmix",
                "--kill-on-bad-exit=1",
                "-n",
                &ranks.to_string(),
                &format!("--cpus-per-task={}", args.threads),
            ]);
            c
        }
    }
}

/// Makes (once) a synthetic healthy corpus at the preset's grid with at least `train`
/// training subjects, through this binary's `synth` and `pack`.
fn synthetic_corpus(exe: &Path, out: &Path, preset: Preset, train: usize) -> Result<PathBuf> {
    let val_fraction = 0.1;
    let mut n = train + 1;
    while n - val_count(val_fraction, n) < train {
        n += 1;
    }
    let corpus = out.join(format!("synthetic-{preset}-{n}.h5"));
    if corpus.exists() {
        return Ok(corpus);
    }
    let m = ModelConfig::preset(preset);
    let src = out.join(format!("synthetic-{n}"));
    println!(
        "making a synthetic corpus of {n} subjects at the {preset} grid: {}",
        corpus.display()
    );
    let grid = format!("{},{},{}", m.grid[0], m.grid[1], m.grid[2]);
    let steps: [Vec<String>; 2] = [
        vec![
            "synth".into(),
            "--cohort".into(),
            "healthy".into(),
            "--subjects".into(),
            n.to_string(),
            "--seed".into(),
            "1".into(),
            "--force".into(),
            "--out".into(),
            src.display().to_string(),
        ],
        vec![
            "pack".into(),
            "--manifest".into(),
            src.join("manifest.csv").display().to_string(),
            "--out".into(),
            corpus.display().to_string(),
            "--grid".into(),
            grid,
            "--spacing".into(),
            m.spacing.to_string(),
            "--val-fraction".into(),
            val_fraction.to_string(),
        ],
    ];
    for argv in steps {
        let o = Command::new(exe)
            .args(&argv)
            .output()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        if !o.status.success() {
            bail!(
                "mtx-hpc {} failed:\n{}",
                argv.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    Ok(corpus)
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run(args: &ScalingArgs) -> Result<()> {
    let mut ranks = args.ranks.clone();
    ranks.sort_unstable();
    ranks.dedup();
    if ranks.is_empty() || ranks[0] == 0 {
        bail!("--ranks needs positive rank counts, like 1,2,4");
    }
    if args.batch == 0 {
        bail!("--batch must be positive");
    }
    if args.threads == 0 {
        bail!("--threads must be positive");
    }
    if args.steps <= args.warmup {
        bail!(
            "--steps ({}) must exceed --warmup ({}): nothing would be measured",
            args.steps,
            args.warmup
        );
    }
    for &r in &ranks {
        let gb = args.mode.global_batch(r, args.batch);
        let per = gb / r;
        if gb % r != 0 || per % 2 == 1 {
            bail!(
                "{} scaling with batch {}: {r} ranks would get {gb}/{r} subjects each; every \
                 rank needs an even whole number (the triplet pairs subjects)",
                args.mode.name(),
                args.batch
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create the folder", args.out.display()))?;
    let out = args
        .out
        .canonicalize()
        .with_context(|| format!("{}", args.out.display()))?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let max_gb = ranks
        .iter()
        .map(|&r| args.mode.global_batch(r, args.batch))
        .max()
        .unwrap_or(args.batch);
    let corpus = match &args.corpus {
        Some(c) => c.clone(),
        None => synthetic_corpus(&exe, &out, args.preset, max_gb)?,
    };
    let train = Corpus::open(&corpus)?.train_indices().len();
    if train < max_gb {
        bail!(
            "{}: {train} training subjects, fewer than the largest global batch ({max_gb})",
            corpus.display()
        );
    }
    // No validation and no intermediate checkpoints inside the timed steps.
    let config = out.join("bench.toml");
    std::fs::write(
        &config,
        "val_every_epoch = false\ncheckpoint_every = 1000000\nlog_every = 1000000\n",
    )?;

    let mut runs = Vec::new();
    for &r in &ranks {
        let gb = args.mode.global_batch(r, args.batch);
        let name = format!("{}-r{r}", args.mode.name());
        let run_dir = out.join(&name);
        let log = out.join(format!("{name}.log"));
        let mut cmd = launch(args, r);
        cmd.arg(&exe)
            .args(["pretrain", "--corpus"])
            .arg(&corpus)
            .arg("--out")
            .arg(&run_dir)
            .args(["--preset", args.preset.name(), "--stage", &args.stage])
            .args(["--steps", &args.steps.to_string()])
            .args(["--batch", &gb.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .arg("--config")
            .arg(&config)
            .arg("--force");
        println!(
            "{} scaling: {r} rank(s), global batch {gb}, {} steps (log {})",
            args.mode.name(),
            args.steps,
            log.display()
        );
        let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        let f = std::fs::File::create(&log)
            .with_context(|| format!("{}: cannot create", log.display()))?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .status()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        if !status.success() {
            bail!(
                "the {r}-rank run failed ({status}); the end of {}:\n{}",
                log.display(),
                tail(&log, 20)
            );
        }
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .with_context(|| format!("{}: no metrics.jsonl", run_dir.display()))?;
        let s = summarize(&metrics, gb, args.warmup)
            .with_context(|| format!("{}", run_dir.display()))?;
        runs.push((r, s));
    }

    let rows = rows(args.mode, args.batch, &runs);
    std::fs::write(out.join("scaling.csv"), csv(&rows)?)?;
    let title = format!(
        "{} scaling, preset {}, {} stage, {} {} per {}",
        args.mode.name(),
        args.preset,
        args.stage,
        args.batch,
        if args.batch == 1 {
            "subject"
        } else {
            "subjects"
        },
        match args.mode {
            Mode::Weak => "rank",
            Mode::Strong => "step",
        }
    );
    std::fs::write(out.join("scaling.svg"), svg(&rows, &title))?;
    println!(
        "{:>5} {:>6} {:>10} {:>8} {:>8} {:>9} {:>11} {:>10}",
        "ranks", "batch", "subj/s", "eff %", "step ms", "comm ms", "exposed ms", "wait ms"
    );
    for r in &rows {
        println!(
            "{:>5} {:>6} {:>10.3} {:>8.1} {:>8.1} {:>9} {:>11} {:>10}",
            r.ranks,
            r.global_batch,
            r.subjects_per_s,
            100.0 * r.efficiency,
            1e3 * r.step_s,
            fmt_opt(r.comm_s, 1e3),
            fmt_opt(r.comm_exposed_s, 1e3),
            fmt_opt(r.data_wait_s, 1e3)
        );
    }
    println!(
        "wrote {} and {}",
        out.join("scaling.csv").display(),
        out.join("scaling.svg").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, sps: f64, comm: Option<f64>) -> String {
        let mut v = serde_json::json!({
            "step": step, "stage": "triplet", "epoch": 0, "loss": 1.0, "lr": 1e-4,
            "grad_norm": 1.0, "subjects_per_s": sps, "data_s": 0.01, "compute_s": 0.5,
        });
        if let Some(c) = comm {
            v["comm_s"] = c.into();
            v["comm_exposed_s"] = (c / 4.0).into();
            v["data_wait_s"] = 0.002.into();
        }
        v.to_string()
    }

    fn summary(sps: f64, comm: Option<f64>) -> RunSummary {
        RunSummary {
            steps: 3,
            step_s: 1.0 / sps,
            subjects_per_s: sps,
            comm_s: comm,
            comm_exposed_s: comm.map(|c| c / 4.0),
            data_wait_s: comm.map(|_| 0.002),
        }
    }

    #[test]
    fn summary_skips_warm_up_and_averages_step_times_not_rates() {
        // Warm-up steps 1-2 are slow; steps 3-4 take 1 s and 3 s for a batch of 4.
        let text = [
            line(1, 0.1, Some(9.0)),
            line(2, 0.1, Some(9.0)),
            line(3, 4.0, Some(0.2)),
            line(4, 4.0 / 3.0, Some(0.4)),
        ]
        .join("\n");
        let s = summarize(&text, 4, 2).unwrap();
        assert_eq!(s.steps, 2);
        assert!((s.step_s - 2.0).abs() < 1e-12);
        // 4 subjects per 2 s: the mean of the rates (2.67) would overstate it.
        assert!((s.subjects_per_s - 2.0).abs() < 1e-12);
        assert!((s.comm_s.unwrap() - 0.3).abs() < 1e-12);
        assert!((s.comm_exposed_s.unwrap() - 0.075).abs() < 1e-12);
        assert!((s.data_wait_s.unwrap() - 0.002).abs() < 1e-12);
    }

    #[test]
    fn summary_of_a_single_process_run_has_no_comm_fields() {
        let text = [line(1, 1.0, None), line(2, 2.0, None)].join("\n");
        let s = summarize(&text, 2, 1).unwrap();
        assert_eq!(
            (s.comm_s, s.comm_exposed_s, s.data_wait_s),
            (None, None, None)
        );
        assert!((s.step_s - 1.0).abs() < 1e-12);
    }

    #[test]
    fn summary_needs_steps_after_warm_up() {
        let text = [line(1, 1.0, None), line(2, 2.0, None)].join("\n");
        let e = summarize(&text, 2, 2).unwrap_err().to_string();
        assert!(e.contains("warm-up"), "{e}");
        assert!(summarize("{not json", 2, 0).is_err());
    }

    #[test]
    fn weak_and_strong_efficiency() {
        // Weak: 2 per rank; 1 rank does 4 subj/s, 2 ranks 7.2 subj/s (ideal 8): 90 %.
        let rows_w = rows(
            Mode::Weak,
            2,
            &[(2, summary(7.2, Some(0.1))), (1, summary(4.0, None))],
        );
        assert_eq!(rows_w.len(), 2);
        assert_eq!(
            (
                rows_w[0].ranks,
                rows_w[0].global_batch,
                rows_w[0].per_rank_batch
            ),
            (1, 2, 2)
        );
        assert_eq!(
            (
                rows_w[1].ranks,
                rows_w[1].global_batch,
                rows_w[1].per_rank_batch
            ),
            (2, 4, 2)
        );
        assert!((rows_w[0].efficiency - 1.0).abs() < 1e-12);
        assert!((rows_w[1].efficiency - 0.9).abs() < 1e-12);
        // Strong: global batch 8; 2 s per step on 2 ranks, 1.25 s on 4: T2*2/(T4*4) = 0.8.
        let rows_s = rows(
            Mode::Strong,
            8,
            &[(2, summary(4.0, None)), (4, summary(6.4, None))],
        );
        assert_eq!((rows_s[1].global_batch, rows_s[1].per_rank_batch), (8, 2));
        assert!((rows_s[1].efficiency - 0.8).abs() < 1e-12);
        assert!(rows(Mode::Weak, 2, &[]).is_empty());
    }

    #[test]
    fn csv_has_a_header_and_one_row_per_rank_count() {
        let r = rows(
            Mode::Weak,
            2,
            &[(1, summary(4.0, None)), (2, summary(7.2, Some(0.1)))],
        );
        let text = csv(&r).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ranks,mode,global_batch,per_rank_batch,subjects_per_s,efficiency,step_s,comm_s,\
             comm_exposed_s,data_wait_s,steps_measured"
        );
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "1,weak,2,2,4.0,1.0,0.25,,,,3");
        assert!(lines[2].starts_with("2,weak,4,2,7.2,0.9"), "{}", lines[2]);
        assert!(lines[2].ends_with(",0.1,0.025,0.002,3"), "{}", lines[2]);
    }

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(ticks(7.2), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(ticks(100.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let t = ticks(0.33);
        assert_eq!(t.len(), 5);
        assert!((t[4] - 0.4).abs() < 1e-12 && (t[1] - 0.1).abs() < 1e-12);
        assert_eq!(ticks(16.0), vec![0.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(ticks(0.0), ticks(1.0));
        assert!(ticks(f64::NAN).len() >= 2);
    }

    /// The numbers of a polyline's points attribute.
    fn polyline(svg: &str, class: &str) -> Vec<(f64, f64)> {
        let key = format!(r#"class="{class}" points=""#);
        let start = svg.find(&key).unwrap() + key.len();
        let end = start + svg[start..].find('"').unwrap();
        svg[start..end]
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn svg_places_points_on_the_axes() {
        let r = rows(
            Mode::Weak,
            2,
            &[
                (1, summary(4.0, None)),
                (2, summary(7.2, None)),
                (4, summary(12.8, None)),
            ],
        );
        let s = svg(&r, "weak <scaling> & more");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("weak &lt;scaling&gt; &amp; more"));
        assert_eq!(s.matches("<circle").count(), 6);
        // Ranks on a log2 axis: 1, 2, 4 evenly spaced from x = 70 to 570.
        let thr = polyline(&s, "throughput");
        assert_eq!(
            thr.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![70.0, 320.0, 570.0]
        );
        // Throughput axis 0..20 (ticks covering the ideal 16 at 4 ranks) over y 340..50.
        assert!((thr[2].1 - (340.0 - 12.8 / 20.0 * 290.0)).abs() < 0.051);
        assert!((thr[0].1 - (340.0 - 4.0 / 20.0 * 290.0)).abs() < 0.051);
        // Efficiency axis 0..100 %: 1.0 at the top, 0.8 at 340 - 0.8 * 290.
        let eff = polyline(&s, "efficiency");
        assert!((eff[0].1 - 50.0).abs() < 0.051);
        assert!((eff[2].1 - (340.0 - 0.8 * 290.0)).abs() < 0.051);
        let ideal = polyline(&s, "ideal");
        assert!((ideal[2].1 - (340.0 - 16.0 / 20.0 * 290.0)).abs() < 0.051);
        // One rank count: the point sits in the middle.
        let one = svg(&r[..1], "t");
        assert_eq!(polyline(&one, "throughput")[0].0, 320.0);
        assert!(svg(&[], "empty").contains("</svg>"));
    }
}
