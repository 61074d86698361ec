//! The pretraining loop: triplet (encoder) then MEVP (transformer, encoder frozen unless
//! `trainable_encoder_in_mevp`) in one run folder, with validation each epoch, early
//! stopping, checkpoints and exact resume. Every random draw is keyed by (seed, epoch,
//! subject, purpose), so a resumed run repeats the uninterrupted one bit for bit without
//! saving any RNG state.
use super::checkpoint::{self, Checkpoint, CheckpointMeta};
use super::config::{RunConfig, Stage, Stages};
use super::target_cache::{self, TargetCache};
use crate::backend::{Adam, Backend};
use crate::data::corpus::Corpus;
use crate::data::shard;
use crate::model::augment::Curve;
use crate::model::config::ModelConfig;
use crate::model::init;
use crate::model::layout::{Layout, Part};
use crate::model::objective::{self, DropoutDraw, Masks, MevpOptions, Net};
use crate::model::planes::Plane;
use crate::rng;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the run's state lives between steps (parameters, Adam moments, gradients).
pub struct State<B: Backend> {
    pub params: B::Buf,
    pub grads: B::Buf,
    pub m: B::Buf,
    pub v: B::Buf,
    /// Global step number of the last completed step (0 before any).
    pub step: u64,
    pub best_val: Option<f64>,
    /// Epochs since the validation loss last improved, in the current stage.
    pub stale_epochs: u64,
}

/// Position codes and [MASK] vectors per plane, fixed while the encoder is frozen.
type MevpConsts<B> = ([<B as Backend>::Buf; 3], [<B as Backend>::Buf; 3]);

/// One line of metrics.jsonl.
#[derive(serde::Serialize)]
struct Metrics<'a> {
    step: u64,
    stage: &'a str,
    epoch: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    subjects_per_s: f64,
    data_s: f64,
    compute_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
}

/// A pretraining run on one process.
pub struct Trainer<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: RunConfig,
    pub model: ModelConfig,
    pub layout: Layout,
    pub net: Net,
    pub corpus: &'a Corpus,
    pub corpus_checksum: String,
    pub out: PathBuf,
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    /// Stop after this many steps of this process (tests of resume); None runs to the end.
    pub stop_after: Option<u64>,
    /// Make this global step's loss NaN (tests of the non-finite stop).
    pub poison_step: Option<u64>,
    pub quiet: bool,
    /// The MEVP target cache in the run folder (see [`Trainer::targets`]); its key folder is
    /// chosen again at each stage.
    pub cache: std::cell::RefCell<TargetCache>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    pub fn steps_per_epoch(&self) -> u64 {
        (self.train.len() / self.cfg.batch) as u64
    }

    /// Total steps of one stage: `steps` when given, else epochs x steps per epoch.
    pub fn stage_steps(&self) -> u64 {
        self.cfg
            .steps
            .unwrap_or(self.cfg.epochs * self.steps_per_epoch())
    }

    /// The stages this run performs, with their first global step.
    pub fn plan(&self) -> Vec<(Stage, u64)> {
        let stages: &[Stage] = match self.cfg.stage {
            Stages::All => &[Stage::Triplet, Stage::Mevp],
            Stages::Triplet => &[Stage::Triplet],
            Stages::Mevp => &[Stage::Mevp],
        };
        stages
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, i as u64 * self.stage_steps()))
            .collect()
    }

    /// Fresh state: parameters from the seed, zero moments.
    pub fn fresh_state(&self) -> State<B> {
        let params = init::init_params(&self.layout, self.cfg.seed);
        let n = self.layout.total();
        State {
            params: self.be.upload(&params),
            grads: self.be.zeros(n),
            m: self.be.zeros(n),
            v: self.be.zeros(n),
            step: 0,
            best_val: None,
            stale_epochs: 0,
        }
    }

    /// State from a checkpoint of this run (parameters, moments, step, best loss).
    pub fn resume_state(&self, ckpt: &Checkpoint) -> Result<State<B>> {
        ckpt.check_layout(&self.layout)?;
        let params = ckpt.read_params(&self.layout)?;
        let (m, v) = ckpt
            .read_moments(&self.layout)?
            .with_context(|| format!("{}: holds no optimizer moments", ckpt.path().display()))?;
        Ok(State {
            params: self.be.upload(&params),
            grads: self.be.zeros(self.layout.total()),
            m: self.be.upload(&m),
            v: self.be.upload(&v),
            step: ckpt.meta.step,
            best_val: ckpt.meta.best_val_loss,
            stale_epochs: ckpt.meta.stale_epochs,
        })
    }

    fn lr(&self, stage: Stage, epoch: u64) -> f64 {
        self.cfg.lr(stage) * self.cfg.lr_decay.powi(epoch as i32)
    }

    fn part(stage: Stage) -> Part {
        match stage {
            Stage::Triplet => Part::Encoder,
            Stage::Mevp => Part::Transformer,
        }
    }

    /// The parameters a stage trains (gradients zeroed, clipped and stepped over this range):
    /// its [`Part`], or with `trainable_encoder_in_mevp` the whole buffer for MEVP (the parts
    /// are contiguous: transformer, then encoder).
    pub fn trainable_range(&self, stage: Stage) -> std::ops::Range<usize> {
        if stage == Stage::Mevp && self.cfg.trainable_encoder_in_mevp {
            let (t, e) = (
                self.layout.part_range(Part::Transformer),
                self.layout.part_range(Part::Encoder),
            );
            t.start..e.end
        } else {
            self.layout.part_range(Self::part(stage))
        }
    }

    /// The MEVP options of this run; dropout only in training steps (those that compute
    /// gradients), keyed by (seed, epoch, subject), never in validation.
    fn mevp_options(&self, training: bool, subjects: &[usize], epoch_key: u64) -> MevpOptions {
        let dropout = (training && self.cfg.dropout > 0.0).then(|| DropoutDraw {
            p: self.cfg.dropout,
            seed: self.cfg.seed,
            key: epoch_key,
            subjects: subjects.iter().map(|&s| s as u64).collect(),
        });
        MevpOptions {
            joint: self.cfg.joint_sequence,
            dropout,
        }
    }

    /// Volumes of the given corpus subjects, concatenated `[b, X, Y, Z]`.
    fn read_volumes(&self, subjects: &[usize]) -> Result<Vec<f32>> {
        let per: usize = self.model.grid.iter().product();
        let mut out = Vec::with_capacity(subjects.len() * per);
        let (mut raw, mut vol) = (Vec::new(), Vec::new());
        for &s in subjects {
            self.corpus.read_volume(s, &mut raw, &mut vol)?;
            out.extend_from_slice(&vol);
        }
        Ok(out)
    }

    /// Positives: each anchor after its own intensity curve, keyed by (seed, epoch, subject).
    fn positives(&self, anchors: &[f32], subjects: &[usize], epoch: u64) -> Vec<f32> {
        let per: usize = self.model.grid.iter().product();
        let mut out = anchors.to_vec();
        for (k, &s) in subjects.iter().enumerate() {
            let mut r = rng::keyed(self.cfg.seed, &[epoch, s as u64], "bezier");
            Curve::random(&mut r).apply(&mut out[k * per..(k + 1) * per]);
        }
        out
    }

    /// MEVP masks of each subject, keyed by (seed, key, subject).
    fn masks(&self, subjects: &[usize], key: u64, purpose: &str) -> Vec<Masks> {
        subjects
            .iter()
            .map(|&s| {
                Plane::ALL.map(|plane| {
                    let (n, _, _) = plane.geometry(self.model.grid);
                    let k = ((n as f64) * self.cfg.mask_fraction).floor() as usize;
                    let mut r = rng::keyed(
                        self.cfg.seed,
                        &[key, s as u64],
                        &format!("{purpose}-{}", plane.name()),
                    );
                    rng::choose(&mut r, n, k)
                })
            })
            .collect()
    }

    /// Position codes and [MASK] vectors per plane (fixed while the encoder is frozen). With
    /// a trainable encoder the [MASK] vectors change every step: the objective computes them,
    /// and they are left empty here.
    fn mevp_constants(&self, params: &B::Buf) -> MevpConsts<B> {
        let pos = Plane::ALL.map(|p| {
            let (n, _, _) = p.geometry(self.model.grid);
            self.be
                .upload(&init::positions(n, self.model.d, self.model.pos_base))
        });
        let tokens = Plane::ALL.map(|p| {
            if self.cfg.trainable_encoder_in_mevp {
                self.be.zeros(0)
            } else {
                objective::mask_token(self.be, &self.net, params, &self.layout, p)
            }
        });
        (pos, tokens)
    }

    /// The loss of one batch; gradients accumulate into `grads` when given.
    fn batch_loss(
        &self,
        stage: Stage,
        params: &B::Buf,
        grads: Option<&mut B::Buf>,
        subjects: &[usize],
        volumes: &[f32],
        epoch_key: u64,
        purpose: &str,
        consts: Option<&MevpConsts<B>>,
    ) -> f64 {
        let b = subjects.len();
        match stage {
            Stage::Triplet => {
                let positives = self.positives(volumes, subjects, epoch_key);
                objective::triplet(
                    self.be,
                    &self.net,
                    params,
                    grads,
                    &self.layout,
                    volumes,
                    &positives,
                    b,
                    self.cfg.margin as f32,
                )
            }
            Stage::Mevp => {
                let (pos, tokens) = consts.expect("MEVP needs its constants");
                let masks = self.masks(subjects, epoch_key, purpose);
                let opts = self.mevp_options(grads.is_some(), subjects, epoch_key);
                if self.cfg.trainable_encoder_in_mevp {
                    // The encoder changes every step: no cache, targets from this forward.
                    return objective::mevp_trainable(
                        self.be,
                        &self.net,
                        params,
                        grads,
                        &self.layout,
                        volumes,
                        pos,
                        &masks,
                        &opts,
                        None,
                    );
                }
                let targets = self.targets(params, subjects, volumes);
                objective::mevp_with(
                    self.be,
                    &self.net,
                    params,
                    grads,
                    &self.layout,
                    &targets,
                    tokens,
                    pos,
                    &masks,
                    &opts,
                )
            }
        }
    }

    /// MEVP targets of a batch: the encoder's vectors per plane. With `cache_targets`, read
    /// from the run folder's cache when every subject has a file there for this corpus and
    /// this encoder (it is frozen during MEVP, so they never change), else computed and the
    /// missing files written (see [`target_cache`](super::target_cache)). A cache that cannot
    /// be used only costs time: a warning, and the encoder runs.
    fn targets(&self, params: &B::Buf, subjects: &[usize], volumes: &[f32]) -> [B::Buf; 3] {
        let d = self.model.d;
        let counts = Plane::ALL.map(|p| p.geometry(self.model.grid).0);
        let mut cache = self.cache.borrow_mut();
        let place = if self.cfg.cache_targets {
            // The key is computed at every call, so a changed encoder can never hit.
            let enc = self.layout.part_range(Part::Encoder);
            let mut host = vec![0.0f32; enc.len()];
            self.be.download(self.be.view(params, enc), &mut host);
            let key = target_cache::key(&self.corpus_checksum, &host);
            match cache.folder(&self.out, &key) {
                Ok(folder) => Some((folder, key)),
                Err(e) => {
                    cache.warn(&e);
                    None
                }
            }
        } else {
            None
        };
        let mut found = Vec::with_capacity(subjects.len());
        if let Some((folder, key)) = &place {
            for &s in subjects {
                found.push(cache.read(folder, key, s, d, counts));
            }
            if found.iter().all(Option::is_some) {
                let found: Vec<_> = found.into_iter().flatten().collect();
                return Plane::ALL.map(|p| {
                    let host: Vec<f32> = found
                        .iter()
                        .flat_map(|v| v[p.index()].iter().copied())
                        .collect();
                    self.be.upload(&host)
                });
            }
        }
        let b = subjects.len();
        let targets = Plane::ALL.map(|p| {
            objective::encode_plane(self.be, &self.net, params, &self.layout, p, volumes, b)
        });
        if let Some((folder, key)) = &place {
            let hosts = targets.each_ref().map(|t| {
                let mut h = vec![0.0f32; self.be.len(t)];
                self.be.download(self.be.view(t, 0..h.len()), &mut h);
                h
            });
            let per = counts.map(|n| n * d);
            for (k, &s) in subjects.iter().enumerate() {
                if found[k].is_some() {
                    continue;
                }
                let parts = [0, 1, 2].map(|p| &hosts[p][k * per[p]..(k + 1) * per[p]]);
                if let Err(e) = cache.write(folder, key, s, d, parts) {
                    cache.warn(&e);
                }
            }
        }
        targets
    }

    /// Mean loss over the validation subjects (fixed masks and curves, so epochs compare).
    fn validate(
        &self,
        stage: Stage,
        params: &B::Buf,
        consts: Option<&MevpConsts<B>>,
    ) -> Result<Option<f64>> {
        // Triplet batches pair subjects: use an even number of validation subjects.
        let usable = match stage {
            Stage::Triplet => self.val.len() / 2 * 2,
            Stage::Mevp => self.val.len(),
        };
        if usable == 0 {
            return Ok(None);
        }
        let (mut sum, mut batches) = (0.0, 0);
        for chunk in self.val[..usable].chunks(self.cfg.batch) {
            let volumes = self.read_volumes(chunk)?;
            sum += self.batch_loss(
                stage,
                params,
                None,
                chunk,
                &volumes,
                u64::MAX,
                "val-mask",
                consts,
            );
            batches += 1;
        }
        Ok(Some(sum / batches as f64))
    }

    fn meta(&self, stage: Stage, state: &State<B>) -> CheckpointMeta {
        let spe = self.steps_per_epoch().max(1);
        let stage_start = self
            .plan()
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(0, |p| p.1);
        CheckpointMeta {
            stage,
            step: state.step,
            epoch: (state.step - stage_start) / spe,
            best_val_loss: state.best_val,
            stale_epochs: state.stale_epochs,
            model: self.model.clone(),
            run: self.cfg.clone(),
            corpus_checksum: self.corpus_checksum.clone(),
        }
    }

    fn save(&self, path: &Path, stage: Stage, state: &State<B>) -> Result<()> {
        let n = self.layout.total();
        let (mut p, mut m, mut v) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        self.be.download(self.be.view(&state.params, 0..n), &mut p);
        self.be.download(self.be.view(&state.m, 0..n), &mut m);
        self.be.download(self.be.view(&state.v, 0..n), &mut v);
        Checkpoint::write(
            path,
            &self.layout,
            &p,
            Some(&m),
            Some(&v),
            &self.meta(stage, state),
        )
    }

    /// Runs every remaining step of the plan from `state`.
    pub fn run(&self, state: &mut State<B>) -> Result<()> {
        let spe = self.steps_per_epoch();
        if spe == 0 {
            bail!(
                "the batch ({}) is larger than the training set ({} subjects)",
                self.cfg.batch,
                self.train.len()
            );
        }
        let total = self.stage_steps();
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.out.join("metrics.jsonl"))
            .with_context(|| format!("{}: cannot open metrics.jsonl", self.out.display()))?;
        let mut done_here = 0u64;
        // A bar on a terminal (log lines print above it); nothing extra in batch logs.
        let plan = self.plan();
        let bar = crate::progress::bar(plan.len() as u64 * total, "pretrain");
        bar.set_position(state.step);
        let say = |line: String| {
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        };
        for (stage, start) in self.plan() {
            let end = start + total;
            if state.step >= end {
                continue;
            }
            if state.step <= start {
                state.stale_epochs = 0;
                state.best_val = None;
            }
            let part = self.trainable_range(stage);
            let consts = (stage == Stage::Mevp).then(|| self.mevp_constants(&state.params));
            self.cache.borrow_mut().clear();
            while state.step < end {
                if self.stop_after.is_some_and(|k| done_here >= k) {
                    return Ok(());
                }
                let local = state.step - start;
                let (epoch, k) = (local / spe, (local % spe) as usize);
                let t0 = Instant::now();
                let batches = shard::rank_batches(
                    self.train.len(),
                    self.cfg.seed,
                    epoch,
                    0,
                    1,
                    self.cfg.batch,
                )?;
                let subjects: Vec<usize> = batches[k].iter().map(|&i| self.train[i]).collect();
                let volumes = self.read_volumes(&subjects)?;
                let data_s = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                self.be
                    .fill(self.be.view_mut(&mut state.grads, part.clone()), 0.0);
                let mut loss = self.batch_loss(
                    stage,
                    &state.params,
                    Some(&mut state.grads),
                    &subjects,
                    &volumes,
                    epoch,
                    "mask",
                    consts.as_ref(),
                );
                if self.poison_step == Some(state.step + 1) {
                    loss = f64::NAN;
                }
                let g = self.be.view(&state.grads, part.clone());
                let norm = self.be.sum_squares(g).sqrt();
                if !loss.is_finite() || !norm.is_finite() {
                    let last = checkpoint::latest_complete(&self.out)?;
                    bail!(
                        "step {}: non-finite {} (loss {loss}, gradient norm {norm}); the last good checkpoint is {}",
                        state.step + 1,
                        if loss.is_finite() { "gradient" } else { "loss" },
                        last.map_or("none".to_string(), |p| p.display().to_string())
                    );
                }
                // clip 0 turns clipping off (train/config.rs).
                if self.cfg.clip > 0.0 && norm > self.cfg.clip {
                    self.be.scale(
                        (self.cfg.clip / norm) as f32,
                        self.be.view_mut(&mut state.grads, part.clone()),
                    );
                }
                let lr = self.lr(stage, epoch);
                let h = Adam {
                    lr: lr as f32,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: self.cfg.weight_decay as f32,
                    step: local + 1,
                };
                {
                    let grads = self.be.view(&state.grads, part.clone());
                    let (mut pm, mut mm, mut vm) = (
                        self.be.view_mut(&mut state.params, part.clone()),
                        self.be.view_mut(&mut state.m, part.clone()),
                        self.be.view_mut(&mut state.v, part.clone()),
                    );
                    self.be.adam(
                        &h,
                        self.be.reborrow_mut(&mut pm),
                        grads,
                        self.be.reborrow_mut(&mut mm),
                        self.be.reborrow_mut(&mut vm),
                    );
                }
                let compute_s = t1.elapsed().as_secs_f64();
                state.step += 1;
                done_here += 1;

                let epoch_done = (local + 1) % spe == 0;
                let mut val_loss = None;
                if epoch_done && self.cfg.val_every_epoch {
                    val_loss = self.validate(stage, &state.params, consts.as_ref())?;
                }
                let line = Metrics {
                    step: state.step,
                    stage: stage.name(),
                    epoch,
                    loss,
                    lr,
                    grad_norm: norm,
                    subjects_per_s: subjects.len() as f64 / (data_s + compute_s).max(1e-9),
                    data_s,
                    compute_s,
                    val_loss,
                };
                writeln!(metrics, "{}", serde_json::to_string(&line)?).with_context(|| {
                    format!("{}: cannot write metrics.jsonl", self.out.display())
                })?;
                bar.set_position(state.step);
                bar.set_message(format!("{} loss {loss:.4}", stage.name()));
                if !self.quiet && (state.step % self.cfg.log_every == 0 || val_loss.is_some()) {
                    say(format!(
                        "step {:>6} {:<7} epoch {:>3} loss {:.5} lr {:.2e} |g| {:.3} {:.2} subj/s data {:.2}s compute {:.2}s{}",
                        state.step,
                        stage.name(),
                        epoch,
                        loss,
                        lr,
                        norm,
                        line.subjects_per_s,
                        data_s,
                        compute_s,
                        val_loss.map_or(String::new(), |v| format!(" val {v:.5}"))
                    ));
                }
                let mut stop = false;
                if let Some(v) = val_loss {
                    if state.best_val.is_none_or(|b| v < b) {
                        state.best_val = Some(v);
                        state.stale_epochs = 0;
                        self.save(&self.out.join("best.h5"), stage, state)?;
                    } else {
                        state.stale_epochs += 1;
                        // patience 0 never stops early (train/config.rs).
                        stop = self.cfg.patience > 0 && state.stale_epochs >= self.cfg.patience;
                    }
                }
                if state.step % self.cfg.checkpoint_every == 0 || state.step == end || stop {
                    self.save(
                        &self.out.join(checkpoint::step_file_name(state.step)),
                        stage,
                        state,
                    )?;
                    checkpoint::prune(&self.out, self.cfg.keep_last)?;
                }
                if stop {
                    if !self.quiet {
                        say(format!(
                            "{}: early stop after {} epochs without improvement",
                            stage.name(),
                            state.stale_epochs
                        ));
                    }
                    state.step = end;
                    self.save(
                        &self.out.join(checkpoint::step_file_name(state.step)),
                        stage,
                        state,
                    )?;
                }
            }
            if stage == *self.plan().last().map(|(s, _)| s).unwrap_or(&stage) {
                self.save(&self.out.join("final.h5"), stage, state)?;
            }
        }
        bar.finish();
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `mtx-hpc pretrain`: configuration, run folder, resume, then the loop.
pub fn run(args: &crate::cli::PretrainArgs) -> Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
            .context("cannot set up the worker threads")?;
    }
    let mut cfg = match &args.config {
        Some(p) => RunConfig::load(p)?,
        None => RunConfig::default(),
    };
    if let Some(p) = args.preset {
        cfg.preset = p;
    }
    if let Some(s) = args.stage {
        cfg.stage = s;
    }
    if args.steps.is_some() {
        cfg.steps = args.steps;
    }
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(b) = args.batch {
        cfg.batch = b;
    }
    if let Some(lr) = args.lr {
        cfg.lr_triplet = lr;
        cfg.lr_mevp = lr;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    cfg.validate()?;
    let corpus = Corpus::open(&args.corpus)?;
    let model = cfg.model_config();
    model
        .check_grid(corpus.grid(), corpus.spacing())
        .with_context(|| format!("{}", args.corpus.display()))?;

    let out = &args.out;
    if !out.exists() {
        std::fs::create_dir(out).with_context(|| {
            format!(
                "{}: cannot create the run folder (does its parent exist?)",
                out.display()
            )
        })?;
    }
    let holds_run = out.join("config.toml").exists() || checkpoint::latest_complete(out)?.is_some();
    if holds_run && args.resume.is_none() && !args.force {
        bail!(
            "{}: holds another run (config.toml or checkpoints): use --resume auto to continue \
             it, --force to start over in it, or another --out",
            out.display()
        );
    }
    let layout = Layout::new(&model);
    let trainer = Trainer {
        be: &crate::backend::cpu::Cpu,
        net: Net::new(&model),
        corpus_checksum: crate::io::file_checksum(&args.corpus)?,
        train: corpus.train_indices(),
        val: corpus.val_indices(),
        corpus: &corpus,
        out: out.clone(),
        layout,
        model,
        cfg,
        // Test hooks, documented in docs/CLI.md's pretrain section: stop as if killed after
        // N steps; poison the loss of step N.
        stop_after: env_u64("MTX_TEST_STOP_AFTER"),
        poison_step: env_u64("MTX_TEST_NAN_AT_STEP"),
        quiet: false,
        cache: Default::default(),
    };
    if trainer.train.len() < trainer.cfg.batch {
        bail!(
            "{}: the batch ({}) is larger than the training set ({} subjects)",
            args.corpus.display(),
            trainer.cfg.batch,
            trainer.train.len()
        );
    }
    let resume_from = match args.resume.as_deref() {
        None => None,
        Some("auto") => checkpoint::latest_complete(out)?,
        Some(file) => Some(PathBuf::from(file)),
    };
    let mut state = match &resume_from {
        Some(path) => {
            let ckpt = Checkpoint::read(path)?;
            if ckpt.meta.corpus_checksum != trainer.corpus_checksum {
                bail!(
                    "{}: was trained on another corpus than {} (checksums differ)",
                    path.display(),
                    args.corpus.display()
                );
            }
            println!("resuming from {} (step {})", path.display(), ckpt.meta.step);
            trainer.resume_state(&ckpt)?
        }
        None => {
            if args.resume.is_some() {
                println!(
                    "no complete checkpoint in {}: starting from scratch",
                    out.display()
                );
            }
            trainer.fresh_state()
        }
    };
    if let Some(path) = &args.init_encoder {
        if resume_from.is_some() {
            bail!("--init-encoder and --resume exclude each other");
        }
        let ckpt = Checkpoint::read(path)?;
        ckpt.check_layout(&trainer.layout)?;
        let theirs = ckpt.read_params(&trainer.layout)?;
        let enc = trainer.layout.part_range(Part::Encoder);
        let mut ours = vec![0.0f32; trainer.layout.total()];
        trainer.be.download(&state.params, &mut ours);
        ours[enc.clone()].copy_from_slice(&theirs[enc]);
        state.params = trainer.be.upload(&ours);
        println!("encoder from {}", path.display());
    }
    println!("{}", trainer.cfg.table()?);
    println!(
        "corpus {}: {} training, {} validation subjects; {} steps per epoch; {} steps per stage",
        args.corpus.display(),
        trainer.train.len(),
        trainer.val.len(),
        trainer.steps_per_epoch(),
        trainer.stage_steps()
    );
    trainer.cfg.save(&out.join("config.toml"))?;
    trainer.run(&mut state)?;
    println!(
        "done: step {}; checkpoints in {}",
        state.step,
        out.display()
    );
    Ok(())
}
