//! `mtx-hpc finetune`: one downstream run (one grid cell). Reads the parameters of a
//! pretraining checkpoint (or initialises at random: `--scratch`), adds the task's head, trains
//! on fold k's training part (optionally a label fraction of it), picks the epoch (and the
//! diagnosis threshold) on an inner validation split, and evaluates once on fold k's test
//! part. Writes `metrics.json` (docs/DOWNSTREAM.md), `predictions.csv` and the fine-tuned
//! checkpoint `finetuned.h5`. With `--grid-file F --cell N` the cell comes from a grid file
//! and the run goes to `OUT/<cell folder>`; a cell whose `metrics.json` exists is skipped, a
//! failed one leaves `failed.txt`.
use super::folds::{Folds, Part, SessionLabel, TaskLabel};
use super::metrics::{self, AgeBias, Confusion, Grid3, MetricSet, Region};
use super::report::{self, Cell, Grid, METRICS_FORMAT, MetricsFile};
use super::{Init, Task};
use crate::backend::Backend;
use crate::backend::device::DeviceRequest;
use crate::data::corpus::Corpus;
use crate::data::preprocess::{PackGeometry, PackParams};
use crate::data::writeback;
use crate::io::file_checksum;
use crate::model::augment::Curve;
use crate::model::decoder;
use crate::model::objective::Net;
use crate::model::task::{self, Scalar};
use crate::model::{Head, Layout, ModelConfig, Part as LayoutPart, Plane, Preset, init};
use crate::train::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::train::{RunConfig, Stage};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Fine-tune and evaluate one downstream task from a pretraining checkpoint (or from scratch).
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Fine-tune and evaluate a downstream task (diagnosis, age, segmentation) on one fold",
    long_about = "Fine-tune the pretrained Medical Transformer on one downstream task and \
evaluate it on one cross-validation fold. The folds come from (subject ids, the task's labels, \
--seed): stratified, grouped by subject, disjoint and complete (docs/DOWNSTREAM.md). The run \
trains on fold k's training part (or the nested --label-fraction of it), picks the epoch with \
the lowest loss on an inner validation split (and, for diagnosis, the decision threshold), then \
evaluates once on fold k's test part.\n\nWrites into --out: metrics.json (every metric, null \
with a reason where one cannot be computed), predictions.csv (one row per test session) and \
finetuned.h5 (the fine-tuned model, for `mtx-hpc predict`).\n\nWith --grid-file F --cell N the \
task, fold, label fraction, initialisation and seed come from cell N of the grid file, and \
the run goes to OUT/TASK/fraction-F/INIT/fold-K-seed-S/; a cell whose metrics.json exists is \
skipped, so rerunning a grid fills only the holes, and a failing cell leaves failed.txt \
there.",
    after_help = "Examples:\n  mtx-hpc finetune --task diagnosis --corpus clinical.h5 \
--checkpoint run/best.h5 --out ft/diag --folds 5 --fold 0\n  mtx-hpc finetune --task age \
--corpus clinical.h5 --scratch --preset small --out ft/age-scratch --label-fraction 0.25\n  \
mtx-hpc finetune --grid-file jobs/eval_grid.txt --cell 3 --corpus clinical.h5 --checkpoint \
run --out eval"
)]
pub struct FinetuneArgs {
    /// The downstream task (required unless --grid-file gives it).
    #[arg(long, value_parser = parse_task)]
    pub task: Option<Task>,
    /// The corpus with the task's labels (the clinical cohort).
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output folder of the run (with --grid-file: the grid's root folder).
    #[arg(long)]
    pub out: PathBuf,
    /// Pretraining checkpoint, or a pretraining run folder (its best.h5, else final.h5).
    #[arg(long, conflicts_with = "scratch")]
    pub checkpoint: Option<PathBuf>,
    /// Train the same model from random initialisation: the baseline.
    #[arg(long)]
    pub scratch: bool,
    /// Model preset for --scratch (default: the preset whose grid the corpus has).
    #[arg(long, value_parser = parse_preset)]
    pub preset: Option<Preset>,
    /// Number of cross-validation folds K.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// The test fold, 0 to K-1.
    #[arg(long, default_value_t = 0)]
    pub fold: usize,
    /// Fraction of the fold's training subjects whose labels are used, in (0, 1]; smaller
    /// fractions are subsets of larger ones.
    #[arg(long, default_value_t = 1.0)]
    pub label_fraction: f64,
    /// Train the head and the transformer only; the encoder keeps its pretrained weights.
    #[arg(long)]
    pub freeze_encoder: bool,
    /// Diagnosis: the negative and the positive class, as the corpus spells them.
    #[arg(long, default_value = "CN,AD")]
    pub classes: String,
    /// Training epochs (the epoch with the lowest inner-validation loss is kept) [default: 20;
    /// segmentation 40].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Subjects per step [default: 4; segmentation 1].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Adam learning rate [default: 3e-4; segmentation 1e-2].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule over the run's steps: `constant` (--lr throughout) or `cosine`
    /// (from --lr down to 0 at the last step: lr/2 (1 + cos(pi (step - 1) / steps))).
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub schedule: Schedule,
    /// Decoupled weight decay (AdamW) on the trained parameters; 0 gives Adam.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Probability that a training volume goes through a random monotone intensity curve
    /// (the Bezier curves of the triplet stage) in an epoch; drawn per (seed, epoch, subject).
    #[arg(long, default_value_t = 0.0)]
    pub augment: f64,
    /// Segmentation: cross-entropy weight of the tumour voxels (background weighs 1)
    /// [default: 5].
    #[arg(long)]
    pub tumour_weight: Option<f64>,
    /// Fraction of the (label-fraction) training subjects held out for the inner validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Seed of folds, subsets, initialisation and batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceRequest::Auto)]
    pub device: DeviceRequest,
    /// Worker threads (default: SLURM_CPUS_PER_TASK under Slurm, else every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A grid file (docs/DOWNSTREAM.md): the run is its cell --cell.
    #[arg(long, requires = "cell")]
    pub grid_file: Option<PathBuf>,
    /// The grid cell to run, from 0 (default: SLURM_ARRAY_TASK_ID).
    #[arg(long)]
    pub cell: Option<usize>,
    /// Replace an existing finished run in --out.
    #[arg(long)]
    pub force: bool,
}

/// The learning-rate schedule of a fine-tuning run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// --lr at every step.
    Constant,
    /// Half a cosine from --lr at the first step towards 0 after the last.
    Cosine,
}

impl Schedule {
    /// The learning rate of step `step` (from 1) of `steps`.
    pub fn lr(self, lr: f64, step: u64, steps: u64) -> f64 {
        match self {
            Schedule::Constant => lr,
            Schedule::Cosine => {
                let t = (step.saturating_sub(1)) as f64 / steps.max(1) as f64;
                0.5 * lr * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

fn parse_task(s: &str) -> Result<Task, String> {
    s.parse()
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::from_name(s).ok_or_else(|| format!("unknown preset '{s}' (paper, small or tiny)"))
}

/// What a fine-tuned checkpoint records about its task (attribute `downstream`, JSON):
/// enough for `predict` to turn outputs into answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task: Task,
    pub head: Head,
    /// Diagnosis: [negative, positive].
    pub classes: Option<[String; 2]>,
    /// Diagnosis: the threshold on the positive-class probability.
    pub threshold: Option<f64>,
    /// Age: the standardisation of the training targets (age = mean + sd * output).
    pub age_mean: Option<f64>,
    pub age_sd: Option<f64>,
    /// Age: the bias correction fitted on the training part.
    pub age_bias: Option<[f64; 2]>,
    pub init: Init,
    pub fold: usize,
    pub folds: usize,
    pub fraction: f64,
    pub seed: u64,
    pub corpus_checksum: String,
    pub checkpoint_checksum: Option<String>,
    /// How the training corpus was packed: `predict` packs new scans the same way.
    pub pack: PackParams,
}

/// One run, with everything resolved.
#[derive(Clone, Debug)]
struct Spec {
    task: Task,
    fold: usize,
    folds: usize,
    fraction: f64,
    seed: u64,
    /// The pretraining checkpoint file (None: scratch).
    checkpoint: Option<PathBuf>,
    out: PathBuf,
}

pub fn run(args: &FinetuneArgs) -> Result<()> {
    let threads = args.threads.or_else(|| {
        std::env::var("SLURM_CPUS_PER_TASK")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        pool = pool.num_threads(t);
    }
    let pool = pool.build().context("cannot set up the worker threads")?;
    pool.install(|| match &args.grid_file {
        Some(grid) => run_cell(args, grid),
        None => {
            let task = args
                .task
                .ok_or_else(|| anyhow!("--task is required (or --grid-file and --cell)"))?;
            let spec = Spec {
                task,
                fold: args.fold,
                folds: args.folds,
                fraction: args.label_fraction,
                seed: args.seed,
                checkpoint: pretrained_file(args)?,
                out: args.out.clone(),
            };
            if spec.out.join(report::METRICS_FILE).exists() && !args.force {
                bail!(
                    "{}: holds a finished run (metrics.json); pass --force to replace it",
                    spec.out.display()
                );
            }
            on_device(args, &spec)
        }
    })
}

/// The pretraining checkpoint of `--checkpoint` (a file, or a run folder's best.h5, else its
/// final.h5); None with `--scratch`; an error when neither is given.
fn pretrained_file(args: &FinetuneArgs) -> Result<Option<PathBuf>> {
    if args.scratch {
        return Ok(None);
    }
    let Some(p) = &args.checkpoint else {
        bail!("give --checkpoint (a pretraining checkpoint or run folder) or --scratch");
    };
    if p.is_dir() {
        for name in [checkpoint::BEST, checkpoint::FINAL] {
            let f = p.join(name);
            if f.exists() {
                return Ok(Some(f));
            }
        }
        bail!(
            "{}: a folder without {} or {}: not a pretraining run folder",
            p.display(),
            checkpoint::BEST,
            checkpoint::FINAL
        );
    }
    Ok(Some(p.clone()))
}

/// A grid cell: skip when done, leave failed.txt when it fails, remove a stale one when it
/// succeeds.
fn run_cell(args: &FinetuneArgs, grid_path: &Path) -> Result<()> {
    let grid = Grid::read(grid_path)?;
    let n = match args.cell {
        Some(n) => n,
        None => std::env::var("SLURM_ARRAY_TASK_ID")
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("give --cell N (or run as a Slurm array task)"))?,
    };
    let cell = grid.cell(n)?;
    let out = args.out.join(cell.relative_dir());
    if out.join(report::METRICS_FILE).exists() && !args.force {
        println!(
            "cell {n} ({}) is done: {} exists; skipped",
            cell_line(&cell),
            out.join(report::METRICS_FILE).display()
        );
        return Ok(());
    }
    let checkpoint = match cell.init {
        Init::Scratch => None,
        Init::Pretrained => {
            let a = FinetuneArgs {
                scratch: false,
                ..args.clone()
            };
            Some(pretrained_file(&a).with_context(|| {
                format!(
                    "cell {n} ({}) needs a pretraining checkpoint",
                    cell_line(&cell)
                )
            })?)
            .flatten()
        }
    };
    let spec = Spec {
        task: cell.task,
        fold: cell.fold,
        folds: args.folds,
        fraction: cell.fraction,
        seed: cell.seed,
        checkpoint,
        out: out.clone(),
    };
    println!("grid cell {n}: {} -> {}", cell_line(&cell), out.display());
    match on_device(args, &spec) {
        Ok(()) => {
            let stale = out.join(report::FAILED_FILE);
            if stale.exists() {
                std::fs::remove_file(&stale)
                    .with_context(|| format!("{}: cannot remove", stale.display()))?;
            }
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if let Err(w) = std::fs::create_dir_all(&out)
                .map_err(anyhow::Error::from)
                .and_then(|()| report::write_failed(&out, &cell, &msg))
            {
                eprintln!(
                    "warning: could not write failed.txt in {}: {w:#}",
                    out.display()
                );
            }
            Err(e.context(format!("grid cell {n} ({}) failed", cell_line(&cell))))
        }
    }
}

fn cell_line(c: &Cell) -> String {
    format!("{} {} {} {} {}", c.task, c.fold, c.fraction, c.init, c.seed)
}

/// The options of a run's training loop: the flags given, else the task's defaults.
/// Segmentation's differ: each volume gives a few hundred thousand voxels, most of them
/// background, so one subject a step, tumour voxels weighted 5 in the cross-entropy, a larger
/// learning rate and more epochs leave the all-background plateau that the other tasks'
/// defaults stay on (docs/PERFORMANCE.md, "segmentation").
#[derive(Clone, Copy, Debug, PartialEq)]
struct Training {
    epochs: usize,
    batch: usize,
    lr: f64,
    tumour_weight: f64,
}

impl Training {
    fn of(args: &FinetuneArgs, task: Task) -> Result<Self> {
        let seg = task == Task::Segmentation;
        let t = Self {
            epochs: args.epochs.unwrap_or(if seg { 40 } else { 20 }),
            batch: args.batch.unwrap_or(if seg { 1 } else { 4 }),
            lr: args.lr.unwrap_or(if seg { 1e-2 } else { 3e-4 }),
            tumour_weight: args.tumour_weight.unwrap_or(if seg { 5.0 } else { 1.0 }),
        };
        if t.batch == 0 {
            bail!("--batch must be positive");
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bail!("--lr must be positive, got {}", t.lr);
        }
        if t.epochs == 0 {
            bail!("--epochs must be positive");
        }
        if !(t.tumour_weight.is_finite() && t.tumour_weight > 0.0) {
            bail!("--tumour-weight must be positive, got {}", t.tumour_weight);
        }
        Ok(t)
    }
}

/// Runs `spec` on the device `--device` picks.
fn on_device(args: &FinetuneArgs, spec: &Spec) -> Result<()> {
    struct Job<'a>(&'a FinetuneArgs, &'a Spec);
    impl crate::backend::device::OnBackend for Job<'_> {
        type Out = ();
        fn run<B: Backend>(self, be: &B) -> Result<()> {
            finetune(be, self.0, self.1)
        }
    }
    crate::backend::device::run_on(args.device, 0, false, Job(args, spec))
}

/// One labelled session of the corpus.
#[derive(Clone, Debug)]
struct Sample {
    /// Index in the corpus.
    index: usize,
    subject: String,
    session: String,
    /// Diagnosis: 0 or 1; age: years; segmentation: whole-tumour voxels.
    target: f64,
}

/// The task's label of every session (None: not labelled for it), and the target values.
fn task_labels(
    corpus: &Corpus,
    task: Task,
    classes: Option<&[String; 2]>,
) -> Result<(Vec<SessionLabel>, Vec<Option<f64>>)> {
    let mut labels = Vec::with_capacity(corpus.len());
    let mut targets = Vec::with_capacity(corpus.len());
    let mut buf = Vec::new();
    for (i, s) in corpus.subjects().iter().enumerate() {
        let (label, target) = match task {
            Task::Diagnosis => {
                let c = classes.expect("diagnosis has classes");
                match c.iter().position(|x| *x == s.meta.diagnosis) {
                    Some(k) => (Some(TaskLabel::Class(c[k].clone())), Some(k as f64)),
                    None => (None, None),
                }
            }
            Task::Age => match s.meta.age.filter(|a| a.is_finite()) {
                Some(a) => (Some(TaskLabel::Age(f64::from(a))), Some(f64::from(a))),
                None => (None, None),
            },
            Task::Segmentation => {
                if s.has_segmentation {
                    corpus.read_labels(i, &mut buf)?;
                    let v = buf.iter().filter(|&&l| l != 0).count() as u64;
                    (Some(TaskLabel::TumourVoxels(v)), Some(v as f64))
                } else {
                    (None, None)
                }
            }
        };
        labels.push(SessionLabel {
            subject: s.meta.id.clone(),
            session: s.meta.session.clone(),
            label,
        });
        targets.push(target);
    }
    Ok((labels, targets))
}

/// The labelled sessions of the subjects of `part`.
fn samples_of(corpus: &Corpus, part: &Part, targets: &[Option<f64>]) -> Vec<Sample> {
    let mut out = Vec::new();
    for s in &part.subjects {
        for sess in &s.sessions {
            let index = corpus
                .find(&s.id, Some(sess))
                .expect("fold subjects come from the corpus");
            let target = targets[index].expect("fold sessions are labelled");
            out.push(Sample {
                index,
                subject: s.id.clone(),
                session: sess.clone(),
                target,
            });
        }
    }
    out
}

/// The diagnosis classes of `--classes`, checked against the corpus.
fn parse_classes(text: &str, corpus: &Corpus) -> Result<[String; 2]> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [neg, pos] = parts[..] else {
        bail!("--classes takes two classes, negative then positive (e.g. CN,AD), got '{text}'");
    };
    if neg == pos || neg.is_empty() {
        bail!("--classes needs two different classes, got '{text}'");
    }
    let present: std::collections::BTreeSet<&str> = corpus
        .subjects()
        .iter()
        .map(|s| s.meta.diagnosis.as_str())
        .filter(|d| !d.is_empty())
        .collect();
    for c in [neg, pos] {
        if !present.contains(c) {
            bail!(
                "{}: no subject has diagnosis '{c}' (the corpus has: {})",
                corpus.path().display(),
                if present.is_empty() {
                    "no diagnoses".to_string()
                } else {
                    present.into_iter().collect::<Vec<_>>().join(", ")
                }
            );
        }
    }
    Ok([neg.to_string(), pos.to_string()])
}

/// The model configuration: the checkpoint's, or the preset's for --scratch.
fn model_config(
    corpus: &Corpus,
    pretrained: Option<&Checkpoint>,
    preset: Option<Preset>,
) -> Result<ModelConfig> {
    let cfg = match pretrained {
        Some(ck) => ck.meta.model.clone(),
        None => {
            let preset = match preset {
                Some(p) => p,
                None => Preset::ALL
                    .into_iter()
                    .find(|&p| ModelConfig::preset(p).grid == corpus.grid())
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: grid {:?} matches no preset; pack it with a preset's grid",
                            corpus.path().display(),
                            corpus.grid()
                        )
                    })?,
            };
            ModelConfig::preset(preset)
        }
    };
    cfg.check_grid(corpus.grid(), corpus.spacing())
        .with_context(|| format!("{}", corpus.path().display()))?;
    Ok(cfg)
}

/// Copies the pretrained networks' tensors (by layout name) from a pretraining checkpoint.
fn load_pretrained(ck: &Checkpoint, layout: &Layout, params: &mut [f32]) -> Result<()> {
    if ck.downstream.is_some() {
        bail!(
            "{}: a fine-tuned checkpoint, not a pretraining one; give the pretraining run's \
             checkpoint (or use `mtx-hpc predict` with this one)",
            ck.path().display()
        );
    }
    let backbone = Layout::new(&ck.meta.model);
    let from = ck.read_params(&backbone)?;
    for e in &backbone {
        let dst = layout.range(&e.name)?;
        params[dst].copy_from_slice(&from[e.range()]);
    }
    Ok(())
}

struct Data<'a> {
    corpus: &'a Corpus,
    grid: [usize; 3],
    raw: Vec<half::f16>,
}

impl Data<'_> {
    /// The volumes `[b, X, Y, Z]` of `batch` and (segmentation) their label maps.
    fn read(&mut self, batch: &[&Sample], labels: bool) -> Result<(Vec<f32>, Vec<u8>)> {
        let per: usize = self.grid.iter().product();
        let mut vols = Vec::with_capacity(batch.len() * per);
        let mut labs = Vec::new();
        let (mut v, mut l) = (Vec::new(), Vec::new());
        for s in batch {
            self.corpus.read_volume(s.index, &mut self.raw, &mut v)?;
            vols.extend_from_slice(&v);
            if labels {
                self.corpus.read_labels(s.index, &mut l)?;
                labs.extend_from_slice(&l);
            }
        }
        Ok((vols, labs))
    }
}

/// Per-sample model outputs: the score (probability of the positive class, or the age in
/// years), and for segmentation the class probabilities `[4, X, Y, Z]` on the grid.
#[derive(Default)]
pub(crate) struct Outputs {
    pub scores: Vec<f64>,
    pub probs: Vec<Vec<f32>>,
}

/// The model of a run: shapes, head, how targets become model targets. `predict` uses it
/// too, so evaluation and prediction share one forward pass.
pub(crate) struct Model {
    pub net: Net,
    pub layout: Layout,
    pub task: Task,
    /// Age standardisation (mean, sd).
    pub scale: (f64, f64),
    pub train_encoder: bool,
    /// Segmentation: cross-entropy weight of tumour voxels (1 at prediction: no loss there).
    pub tumour_weight: f64,
}

impl Model {
    fn kind(&self) -> Scalar {
        match self.task {
            Task::Diagnosis => Scalar::Logit,
            _ => Scalar::Value,
        }
    }

    /// The three planes' position codes, uploaded.
    pub fn positions<B: Backend>(&self, be: &B, cfg: &ModelConfig) -> [B::Buf; 3] {
        Plane::ALL.map(|p| {
            let (n, _, _) = p.geometry(cfg.grid);
            be.upload(&init::positions(n, cfg.d, cfg.pos_base))
        })
    }

    /// Loss of `b` subjects `vols [b, X, Y, Z]` (and gradients when `grads` is given), plus
    /// their outputs. `targets` are class indices (0/1) or ages; segmentation reads `labels
    /// [b, X, Y, Z]` (BraTS codes) instead.
    pub fn batch<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: Option<&mut B::Buf>,
        pos: &[B::Buf; 3],
        vols: &[f32],
        labels: &[u8],
        targets: &[f64],
        want_probs: bool,
    ) -> Result<(f64, Outputs)> {
        match self.task {
            Task::Segmentation => {
                let b = targets.len();
                let loss = if labels.is_empty() {
                    0.0
                } else {
                    decoder::classes_of_codes(labels).map_err(|e| anyhow!("labels: {e:#}"))?;
                    decoder::segment_loss(
                        be,
                        &self.net,
                        params,
                        grads,
                        &self.layout,
                        pos,
                        vols,
                        labels,
                        b,
                        self.train_encoder,
                        self.tumour_weight,
                    )
                };
                let mut out = Outputs::default();
                if want_probs {
                    let per = decoder::CLASSES * self.net.grid.iter().product::<usize>();
                    let probs =
                        decoder::segment_probs(be, &self.net, params, &self.layout, pos, vols, b);
                    out.probs = probs.chunks(per).map(<[f32]>::to_vec).collect();
                }
                Ok((loss, out))
            }
            Task::Diagnosis | Task::Age => {
                let (m, s) = self.scale;
                let t: Vec<f32> = targets.iter().map(|x| ((x - m) / s) as f32).collect();
                let (loss, y) = task::scalar_head(
                    be,
                    &self.net,
                    params,
                    grads,
                    &self.layout,
                    pos,
                    vols,
                    &t,
                    self.kind(),
                    self.train_encoder,
                );
                let scores = y
                    .iter()
                    .map(|&y| match self.task {
                        Task::Diagnosis => 1.0 / (1.0 + (-y).exp()),
                        _ => m + s * y,
                    })
                    .collect();
                Ok((
                    loss,
                    Outputs {
                        scores,
                        probs: Vec::new(),
                    },
                ))
            }
        }
    }

    /// Mean loss and outputs over `samples`, without gradients.
    fn evaluate<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        pos: &[B::Buf; 3],
        data: &mut Data<'_>,
        samples: &[Sample],
        batch: usize,
        want_probs: bool,
    ) -> Result<(f64, Outputs)> {
        let mut out = Outputs::default();
        let mut total = 0.0;
        for chunk in samples.chunks(batch) {
            let refs: Vec<&Sample> = chunk.iter().collect();
            let (loss, o) = self.step(be, params, None, pos, data, &refs, want_probs)?;
            total += loss * chunk.len() as f64;
            out.scores.extend(o.scores);
            out.probs.extend(o.probs);
        }
        Ok((total / samples.len().max(1) as f64, out))
    }

    /// [`Model::batch`] on corpus samples.
    fn step<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: Option<&mut B::Buf>,
        pos: &[B::Buf; 3],
        data: &mut Data<'_>,
        batch: &[&Sample],
        want_probs: bool,
    ) -> Result<(f64, Outputs)> {
        let (vols, labels) = data.read(batch, self.task == Task::Segmentation)?;
        let targets: Vec<f64> = batch.iter().map(|s| s.target).collect();
        self.batch(be, params, grads, pos, &vols, &labels, &targets, want_probs)
    }
}

fn finetune<B: Backend>(be: &B, args: &FinetuneArgs, spec: &Spec) -> Result<()> {
    let started = Instant::now();
    super::check_fraction(spec.fraction).map_err(anyhow::Error::msg)?;
    let training = Training::of(args, spec.task)?;
    if !(args.weight_decay.is_finite() && args.weight_decay >= 0.0) {
        bail!(
            "--weight-decay must be 0 or positive, got {}",
            args.weight_decay
        );
    }
    if !(0.0..=1.0).contains(&args.augment) {
        bail!("--augment is a probability in [0, 1], got {}", args.augment);
    }
    let corpus = Corpus::open(&args.corpus)?;
    let corpus_checksum = file_checksum(&args.corpus)?;
    let pretrained = spec
        .checkpoint
        .as_deref()
        .map(Checkpoint::read)
        .transpose()?;
    let checkpoint_checksum = spec.checkpoint.as_deref().map(file_checksum).transpose()?;
    let cfg = model_config(&corpus, pretrained.as_ref(), args.preset)?;
    let task = spec.task;
    let classes = match task {
        Task::Diagnosis => Some(parse_classes(&args.classes, &corpus)?),
        _ => None,
    };
    if task == Task::Segmentation && !corpus.has_labels() {
        bail!(
            "{}: the corpus has no segmentations, so no segmentation labels",
            corpus.path().display()
        );
    }
    let (labels, targets) = task_labels(&corpus, task, classes.as_ref())?;
    if targets.iter().all(Option::is_none) {
        bail!(
            "{}: no subject has a {task} label{}",
            corpus.path().display(),
            match &classes {
                Some(c) => format!(" (diagnosis {} or {})", c[0], c[1]),
                None => String::new(),
            }
        );
    }
    let folds = Folds::new(task, &labels, spec.folds, spec.seed)
        .with_context(|| format!("{}", corpus.path().display()))?;
    let split = folds.fold(spec.fold)?;
    let part = split.train.label_fraction(spec.fraction, spec.seed)?;
    let (fit_part, val_part) = part.inner_split(args.val_fraction, spec.seed)?;
    let fit = samples_of(&corpus, &fit_part, &targets);
    let val = samples_of(&corpus, &val_part, &targets);
    let test = samples_of(&corpus, &split.test, &targets);
    println!("{}", folds.summary());
    println!(
        "fold {} of {}: {} training subjects, label fraction {} -> {} (fit {}, inner validation {}), {} test subjects",
        spec.fold,
        spec.folds,
        split.train.len(),
        spec.fraction,
        part.len(),
        fit_part.len(),
        val_part.len(),
        split.test.len()
    );

    let head = match task {
        Task::Diagnosis => Head::Classify,
        Task::Age => Head::Regress,
        Task::Segmentation => Head::Segment,
    };
    let layout = Layout::with_head(&cfg, head);
    let mut host = init::init_params(&layout, spec.seed);
    if let Some(ck) = &pretrained {
        load_pretrained(ck, &layout, &mut host)?;
    }
    let scale = match task {
        Task::Age => {
            let ages: Vec<f64> = fit.iter().map(|s| s.target).collect();
            let m = ages.iter().sum::<f64>() / ages.len() as f64;
            let var = ages.iter().map(|a| (a - m).powi(2)).sum::<f64>() / ages.len() as f64;
            (m, var.sqrt().max(1e-6))
        }
        _ => (0.0, 1.0),
    };
    let model = Model {
        net: Net::new(&cfg),
        layout,
        task,
        scale,
        train_encoder: !args.freeze_encoder,
        tumour_weight: training.tumour_weight,
    };
    let layout = &model.layout;
    let trainable = if args.freeze_encoder {
        0..layout.part_range(LayoutPart::Transformer).end
    } else {
        0..layout.total()
    };
    let params_trained: usize = layout
        .iter()
        .filter(|e| trainable.contains(&e.offset))
        .map(|e| e.len)
        .sum();
    let params_total = layout.param_total();
    println!(
        "{task}: {} initialisation, preset {}, {params_trained} of {params_total} parameters trained{}",
        if pretrained.is_some() {
            "pretrained"
        } else {
            "scratch"
        },
        cfg.preset,
        if args.freeze_encoder {
            " (encoder frozen)"
        } else {
            ""
        }
    );
    println!(
        "training: {} epochs, batch {}, lr {} ({:?}), weight decay {}{}",
        training.epochs,
        training.batch,
        training.lr,
        args.schedule,
        args.weight_decay,
        if task == Task::Segmentation {
            format!(", tumour weight {}", training.tumour_weight)
        } else {
            String::new()
        }
    );

    let pos = model.positions(be, &cfg);
    let mut params = be.upload(&host);
    let mut grads = be.zeros(layout.total());
    let (mut m, mut v) = (be.zeros(layout.total()), be.zeros(layout.total()));
    let mut data = Data {
        corpus: &corpus,
        grid: cfg.grid,
        raw: Vec::new(),
    };
    let mut best: Option<(f64, usize, Vec<f32>)> = None;
    let seg = task == Task::Segmentation;
    let total_steps = (training.epochs * fit.len().div_ceil(training.batch)) as u64;
    let mut step = 0u64;
    let bar = crate::progress::bar(training.epochs as u64, task.name());
    for epoch in 0..training.epochs {
        let t0 = Instant::now();
        let mut order: Vec<&Sample> = fit.iter().collect();
        let mut r = crate::rng::keyed(spec.seed, &[epoch as u64], "finetune-order");
        for i in (1..order.len()).rev() {
            let j = crate::rng::below(&mut r, (i + 1) as u64) as usize;
            order.swap(i, j);
        }
        let mut train_loss = 0.0;
        for batch in order.chunks(training.batch) {
            be.fill(be.view_mut(&mut grads, 0..layout.total()), 0.0);
            let (mut vols, labels) = data.read(batch, seg)?;
            if args.augment > 0.0 {
                augment(&mut vols, batch, spec.seed, epoch as u64, args.augment);
            }
            let targets: Vec<f64> = batch.iter().map(|s| s.target).collect();
            let (loss, _) = model.batch(
                be,
                &params,
                Some(&mut grads),
                &pos,
                &vols,
                &labels,
                &targets,
                false,
            )?;
            let norm = be.sum_squares(be.view(&grads, trainable.clone())).sqrt();
            if !(loss.is_finite() && norm.is_finite()) {
                bail!(
                    "epoch {}: the loss or the gradient is not finite (loss {loss}, gradient norm {norm})",
                    epoch + 1
                );
            }
            if norm > 1.0 {
                be.scale(
                    (1.0 / norm) as f32,
                    be.view_mut(&mut grads, trainable.clone()),
                );
            }
            step += 1;
            let h = crate::backend::Adam {
                lr: args.schedule.lr(training.lr, step, total_steps) as f32,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: args.weight_decay as f32,
                step,
            };
            let g = be.view(&grads, trainable.clone());
            let (mut pm, mut mm, mut vm) = (
                be.view_mut(&mut params, trainable.clone()),
                be.view_mut(&mut m, trainable.clone()),
                be.view_mut(&mut v, trainable.clone()),
            );
            be.adam(
                &h,
                be.reborrow_mut(&mut pm),
                g,
                be.reborrow_mut(&mut mm),
                be.reborrow_mut(&mut vm),
            );
            train_loss += loss * batch.len() as f64;
        }
        train_loss /= fit.len() as f64;
        let (val_loss, _) =
            model.evaluate(be, &params, &pos, &mut data, &val, training.batch, false)?;
        let improved = best.as_ref().is_none_or(|(b, _, _)| val_loss < *b);
        if improved {
            let mut keep = vec![0.0; layout.total()];
            be.download(be.view(&params, 0..layout.total()), &mut keep);
            best = Some((val_loss, epoch + 1, keep));
        }
        bar.inc(1);
        bar.suspend(|| {
            println!(
                "epoch {:>3}/{}  train loss {train_loss:.5}  inner-val loss {val_loss:.5}{}  {:.1} s",
                epoch + 1,
                training.epochs,
                if improved { " (best)" } else { "" },
                t0.elapsed().as_secs_f64()
            )
        });
    }
    bar.finish_and_clear();
    let (best_val, best_epoch, best_params) = best.expect("at least one epoch");
    println!("kept epoch {best_epoch} (inner-validation loss {best_val:.5})");
    let params = be.upload(&best_params);

    // Decision threshold / bias correction from data the test never saw.
    let (_, val_out) = if seg {
        Default::default()
    } else {
        model.evaluate(be, &params, &pos, &mut data, &val, training.batch, false)?
    };
    let (_, test_out) = model.evaluate(be, &params, &pos, &mut data, &test, training.batch, seg)?;
    let mut results = MetricSet::default();
    let mut record = TaskRecord {
        task,
        head,
        classes: classes.clone(),
        threshold: None,
        age_mean: None,
        age_sd: None,
        age_bias: None,
        init: if pretrained.is_some() {
            Init::Pretrained
        } else {
            Init::Scratch
        },
        fold: spec.fold,
        folds: spec.folds,
        fraction: spec.fraction,
        seed: spec.seed,
        corpus_checksum: corpus_checksum.clone(),
        checkpoint_checksum: checkpoint_checksum.clone(),
        pack: corpus.info().params.clone(),
    };
    let mut rows = Vec::new();
    match task {
        Task::Diagnosis => {
            let truth = |s: &[Sample]| s.iter().map(|x| x.target > 0.5).collect::<Vec<bool>>();
            let (vt, tt) = (truth(&val), truth(&test));
            let threshold = metrics::choose_threshold(&vt, &val_out.scores);
            let used = *threshold.as_ref().unwrap_or(&0.5);
            results.insert("threshold", threshold);
            results.insert("auc", metrics::roc_auc(&tt, &test_out.scores));
            // Resampling the test subjects: the uncertainty of this fold's AUC.
            let ci = metrics::bootstrap_ci(tt.len(), 2000, 0.95, spec.seed, |idx| {
                let l: Vec<bool> = idx.iter().map(|&i| tt[i]).collect();
                let p: Vec<f64> = idx.iter().map(|&i| test_out.scores[i]).collect();
                metrics::roc_auc(&l, &p)
            });
            results.insert("auc_ci95_low", ci.clone().map(|c| c.0));
            results.insert("auc_ci95_high", ci.map(|c| c.1));
            for (suffix, t) in [("", used), ("_at_0.5", 0.5)] {
                match Confusion::at(&tt, &test_out.scores, t) {
                    Ok(c) => {
                        results.insert(&format!("accuracy{suffix}"), c.accuracy());
                        results.insert(&format!("sensitivity{suffix}"), c.sensitivity());
                        results.insert(&format!("specificity{suffix}"), c.specificity());
                        results
                            .insert(&format!("balanced_accuracy{suffix}"), c.balanced_accuracy());
                    }
                    Err(e) => {
                        for name in [
                            "accuracy",
                            "sensitivity",
                            "specificity",
                            "balanced_accuracy",
                        ] {
                            results.insert(&format!("{name}{suffix}"), Err(e.clone()));
                        }
                    }
                }
            }
            record.threshold = Some(used);
            let c = classes.as_ref().expect("diagnosis has classes");
            rows.push("subject_id,session,diagnosis,probability,predicted".to_string());
            for (s, p) in test.iter().zip(&test_out.scores) {
                rows.push(format!(
                    "{},{},{},{p:.6},{}",
                    s.subject,
                    s.session,
                    c[usize::from(s.target > 0.5)],
                    c[usize::from(*p >= used)]
                ));
            }
        }
        Task::Age => {
            let ages = |s: &[Sample]| s.iter().map(|x| x.target).collect::<Vec<f64>>();
            let (train_ages, test_ages) = (ages(&[fit.clone(), val.clone()].concat()), ages(&test));
            let (_, fit_out) =
                model.evaluate(be, &params, &pos, &mut data, &fit, training.batch, false)?;
            let train_preds: Vec<f64> = fit_out
                .scores
                .iter()
                .chain(&val_out.scores)
                .copied()
                .collect();
            let p = &test_out.scores;
            results.insert("mae", metrics::mae(&test_ages, p));
            results.insert("rmse", metrics::rmse(&test_ages, p));
            results.insert("pearson_r", metrics::pearson_r(&test_ages, p));
            let train_mean = train_ages.iter().sum::<f64>() / train_ages.len() as f64;
            results.insert(
                "mae_train_mean",
                metrics::mae(&test_ages, &vec![train_mean; test_ages.len()]),
            );
            let gaps: Vec<f64> = p.iter().zip(&test_ages).map(|(p, a)| p - a).collect();
            results.insert("gap_mean", mean_of(&gaps));
            let bias = AgeBias::fit(&train_ages, &train_preds);
            match &bias {
                Ok(b) => {
                    let cg: Vec<f64> = test_ages
                        .iter()
                        .zip(p)
                        .map(|(&a, &q)| b.corrected_gap(a, q))
                        .collect();
                    results.insert("gap_corrected_mean", mean_of(&cg));
                    results.insert(
                        "gap_corrected_mae",
                        mean_of(&cg.iter().map(|g| g.abs()).collect::<Vec<_>>()),
                    );
                    results.insert("gap_corrected_age_r", metrics::pearson_r(&cg, &test_ages));
                    record.age_bias = Some([b.a, b.b]);
                }
                Err(e) => {
                    for name in [
                        "gap_corrected_mean",
                        "gap_corrected_mae",
                        "gap_corrected_age_r",
                    ] {
                        results.insert(name, Err(e.clone()));
                    }
                }
            }
            record.age_mean = Some(scale.0);
            record.age_sd = Some(scale.1);
            rows.push("subject_id,session,age,predicted_age,gap,gap_corrected".to_string());
            for (s, q) in test.iter().zip(p) {
                let corrected = bias.as_ref().map_or(String::new(), |b| {
                    format!("{:.4}", b.corrected_gap(s.target, *q))
                });
                rows.push(format!(
                    "{},{},{:.4},{q:.4},{:.4},{corrected}",
                    s.subject,
                    s.session,
                    s.target,
                    q - s.target
                ));
            }
        }
        Task::Segmentation => {
            let grid = Grid3 {
                dims: cfg.grid,
                spacing: [cfg.spacing; 3],
            };
            let mut per_region: Vec<Vec<metrics::Metric>> = vec![Vec::new(); 6];
            rows.push(
                "subject_id,session,dice_wt,dice_tc,dice_et,voxels_true,voxels_pred".to_string(),
            );
            let mut truth = Vec::new();
            // Each test subject's predicted mask on its source grid and affine, next to the
            // metrics, so a viewer shows it over the input scan.
            let masks = spec.out.join(MASKS);
            std::fs::create_dir_all(&masks)
                .with_context(|| format!("{}: cannot create", masks.display()))?;
            for (s, probs) in test.iter().zip(&test_out.probs) {
                corpus.read_labels(s.index, &mut truth)?;
                let pred = codes_of_probs(probs, truth.len());
                let g = &corpus.subjects()[s.index].geometry;
                write_mask(&masks, &s.subject, &s.session, probs, cfg.grid, g)?;
                let mut dice = Vec::new();
                for (r, region) in Region::ALL.into_iter().enumerate() {
                    let d = metrics::dice(&pred, &truth, region);
                    dice.push(d.clone());
                    per_region[r].push(d);
                    per_region[3 + r].push(metrics::hd95_region(&pred, &truth, region, grid));
                }
                let fmt =
                    |m: &metrics::Metric| m.as_ref().map_or(String::new(), |v| format!("{v:.4}"));
                rows.push(format!(
                    "{},{},{},{},{},{},{}",
                    s.subject,
                    s.session,
                    fmt(&dice[0]),
                    fmt(&dice[1]),
                    fmt(&dice[2]),
                    truth.iter().filter(|&&l| l != 0).count(),
                    pred.iter().filter(|&&l| l != 0).count()
                ));
            }
            for (r, region) in Region::ALL.into_iter().enumerate() {
                let short = region.short();
                results.insert(
                    &format!("dice_{short}"),
                    metrics::mean_defined(&per_region[r]),
                );
                results.insert(
                    &format!("hd95_{short}"),
                    metrics::mean_defined(&per_region[3 + r]),
                );
            }
        }
    }

    std::fs::create_dir_all(&spec.out)
        .with_context(|| format!("{}: cannot create the output folder", spec.out.display()))?;
    let record_json = serde_json::to_string(&record)?;
    let meta = CheckpointMeta {
        stage: pretrained.as_ref().map_or(Stage::Mevp, |c| c.meta.stage),
        step,
        epoch: best_epoch as u64,
        best_val_loss: Some(best_val),
        stale_epochs: 0,
        model: cfg.clone(),
        run: pretrained.as_ref().map_or_else(
            || RunConfig {
                preset: cfg.preset,
                ..RunConfig::default()
            },
            |c| c.meta.run.clone(),
        ),
        corpus_checksum: corpus_checksum.clone(),
    };
    Checkpoint::write_with(
        &spec.out.join(FINETUNED),
        layout,
        &best_params,
        None,
        None,
        &meta,
        Some(&record_json),
    )?;
    let mut csv = rows.join("\n");
    csv.push('\n');
    crate::io::write_atomic(&spec.out.join(PREDICTIONS), csv.as_bytes(), true)?;
    let file = MetricsFile {
        format: METRICS_FORMAT.to_string(),
        task,
        fold: spec.fold,
        folds: spec.folds,
        fraction: spec.fraction,
        seed: spec.seed,
        init: record.init,
        checkpoint_checksum,
        corpus_checksum,
        tool_version: crate::TOOL_VERSION.to_string(),
        params_trained: params_trained as u64,
        params_total: params_total as u64,
        results,
    };
    // metrics.json last: its presence marks the cell done.
    file.write(&spec.out.join(report::METRICS_FILE), true)?;
    let main = task.main_metric();
    println!(
        "{task} fold {}: {main} = {} on {} test sessions; {} ({:.0} s)",
        spec.fold,
        match file.results.get(main) {
            Some(Ok(v)) => format!("{v:.4}"),
            Some(Err(r)) => format!("null ({r})"),
            None => "?".into(),
        },
        test.len(),
        spec.out.join(report::METRICS_FILE).display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Intensity augmentation of training volumes `[b, X, Y, Z]` (min-max normalised to [0, 1]):
/// with probability `p` a volume goes through a random monotone Bezier curve
/// ([`Curve`]). Both draws come from a stream keyed by (seed, epoch, corpus index), so a run
/// is reproducible whatever the batch size or thread count.
fn augment(vols: &mut [f32], batch: &[&Sample], seed: u64, epoch: u64, p: f64) {
    let per = vols.len() / batch.len().max(1);
    for (s, v) in batch.iter().zip(vols.chunks_mut(per)) {
        let mut r = crate::rng::keyed(seed, &[epoch, s.index as u64], "finetune-bezier");
        if crate::rng::unit(&mut r) < p {
            Curve::random(&mut r).apply(v);
        }
    }
}

/// The fine-tuned checkpoint's file name in a run folder.
pub const FINETUNED: &str = "finetuned.h5";
/// The per-subject test predictions.
pub const PREDICTIONS: &str = "predictions.csv";
/// Segmentation: the test subjects' predicted masks on their source grids.
pub const MASKS: &str = "masks";

fn mean_of(x: &[f64]) -> metrics::Metric {
    if x.is_empty() {
        Err("no subjects".into())
    } else {
        Ok(x.iter().sum::<f64>() / x.len() as f64)
    }
}

/// Writes the mask of a subject's class probabilities `[CLASSES, X, Y, Z]` on the corpus
/// grid as `DIR/<id>[_<session>]_seg.nii.gz` on its source grid and affine (each class
/// map interpolated at the source voxel, then [`decoder::class_of_probs`]); returns the
/// file name and the codes written (NIfTI order).
pub(crate) fn write_mask(
    dir: &Path,
    id: &str,
    session: &str,
    probs: &[f32],
    grid: [usize; 3],
    g: &PackGeometry,
) -> Result<(String, Vec<u8>)> {
    let classes = writeback::probs_to_source(
        probs,
        decoder::CLASSES,
        grid,
        &g.grid_to_source,
        g.source_shape,
        decoder::class_of_probs,
    )?;
    let codes: Vec<u8> = classes
        .iter()
        .map(|&c| decoder::CODES[usize::from(c)])
        .collect();
    let name = if session.is_empty() {
        format!("{id}_seg.nii.gz")
    } else {
        format!("{id}_{session}_seg.nii.gz")
    };
    writeback::write_label_nifti(&dir.join(&name), &codes, g.source_shape, &g.source_affine)?;
    Ok((name, codes))
}

/// The label codes of a probability map `[CLASSES, voxels]`, voxel by voxel with
/// [`decoder::class_of_probs`].
pub(crate) fn codes_of_probs(probs: &[f32], voxels: usize) -> Vec<u8> {
    let mut p = [0.0f32; decoder::CLASSES];
    (0..voxels)
        .map(|v| {
            for (c, p) in p.iter_mut().enumerate() {
                *p = probs[c * voxels + v];
            }
            decoder::CODES[usize::from(decoder::class_of_probs(&p))]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_starts_at_lr_halves_midway_and_stays_positive() {
        let (lr, steps) = (2e-3, 100);
        assert_eq!(Schedule::Constant.lr(lr, 57, steps), lr);
        assert!((Schedule::Cosine.lr(lr, 1, steps) - lr).abs() < 1e-15);
        assert!((Schedule::Cosine.lr(lr, 51, steps) - lr / 2.0).abs() < 1e-12);
        let last = Schedule::Cosine.lr(lr, steps, steps);
        assert!(last > 0.0 && last < 1e-3 * lr, "{last}");
        let all: Vec<f64> = (1..=steps)
            .map(|s| Schedule::Cosine.lr(lr, s, steps))
            .collect();
        assert!(all.windows(2).all(|w| w[1] < w[0]));
    }

    /// The options as the command line gives them.
    fn args(extra: &[&str]) -> FinetuneArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: FinetuneArgs,
        }
        let mut argv = vec!["x", "--corpus", "c.h5", "--out", "o"];
        argv.extend_from_slice(extra);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn training_options_default_by_task_and_each_flag_overrides_its_own() {
        let t = |extra: &[&str], task| Training::of(&args(extra), task);
        let plain = Training {
            epochs: 20,
            batch: 4,
            lr: 3e-4,
            tumour_weight: 1.0,
        };
        assert_eq!(t(&[], Task::Diagnosis).unwrap(), plain);
        assert_eq!(t(&[], Task::Age).unwrap(), plain);
        let seg = Training {
            epochs: 40,
            batch: 1,
            lr: 1e-2,
            tumour_weight: 5.0,
        };
        assert_eq!(t(&[], Task::Segmentation).unwrap(), seg);
        assert_eq!(
            t(&["--batch", "2", "--lr", "1e-3"], Task::Segmentation).unwrap(),
            Training {
                batch: 2,
                lr: 1e-3,
                ..seg
            }
        );
        assert_eq!(t(&["--epochs", "7"], Task::Age).unwrap().epochs, 7);
        for (bad, says) in [
            (&["--batch", "0"][..], "--batch"),
            (&["--lr", "0"][..], "--lr"),
            (&["--epochs", "0"][..], "--epochs"),
            (&["--tumour-weight=-1"][..], "--tumour-weight"),
        ] {
            let e = t(bad, Task::Segmentation).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
