//! The pretraining loop: triplet (encoder) then MEVP (transformer, encoder frozen unless
//! `trainable_encoder_in_mevp`) in one run folder, with validation each epoch, early
//! stopping, checkpoints and exact resume. Every random draw is keyed by (seed, epoch,
//! subject, purpose), so a resumed run repeats the uninterrupted one bit for bit without
//! saving any RNG state.
use super::checkpoint::{self, Checkpoint, CheckpointMeta};
use super::config::{RunConfig, Stage, Stages};
use super::grad_comm::{self, Reducer};
use super::overlap::Overlap;
use super::prefetch::{self, Prefetch};
use super::target_cache::{self, TargetCache};
use crate::backend::{Adam, Backend};
use crate::data::corpus::Corpus;
use crate::data::shard;
use crate::dist::{Collective, Op, SlurmEnv, World};
use crate::model::augment::Curve;
use crate::model::config::ModelConfig;
use crate::model::init;
use crate::model::layout::{Layout, Part};
use crate::model::objective::{self, DropoutDraw, Masks, MevpOptions, Net};
use crate::model::params::ParamIndex;
use crate::model::planes::Plane;
use crate::rng;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Exit status of a run stopped by SIGUSR1/SIGTERM after writing its checkpoint: the job
/// script requeues on it and `--resume auto` continues (EX_TEMPFAIL).
pub const EXIT_INTERRUPTED: u8 = 75;

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
    /// Largest time any rank waited for its batch.
    data_wait_s: f64,
    /// Gradient all-reduce time, and the part of it the step waited for beyond waiting for
    /// the slowest rank to finish backward (`wait_slowest_s`, load imbalance, not network).
    comm_s: f64,
    comm_exposed_s: f64,
    wait_slowest_s: f64,
    /// Gradient buckets whose all-reduce started before backward ended.
    comm_buckets_early: usize,
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
    /// This process's place in the job (a world of one without a launcher).
    pub world: &'a World,
    /// Fail with an error at this global step (tests of a rank fault).
    pub fail_step: Option<u64>,
    /// The rank the test hooks act on (None: every rank).
    pub hook_rank: Option<usize>,
    /// Reading this corpus subject index fails (tests of unreadable data).
    pub unreadable: Option<usize>,
    /// Set by SIGUSR1/SIGTERM: checkpoint after the current step and exit 75.
    pub stop_signal: Arc<AtomicBool>,
    /// How the gradient buckets are summed over ranks (None for a world of one).
    pub grad_comm: Option<Reducer>,
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
        let mut out = Vec::new();
        prefetch::read_subjects(self.corpus, subjects, self.unreadable, &mut out)?;
        Ok(out)
    }

    /// This rank's subjects for each global step in `from..end` of the stage starting at
    /// `start` (the same global batches whatever the world size; see data/shard.rs).
    fn schedule(&self, start: u64, from: u64, end: u64) -> Result<Vec<Vec<usize>>> {
        let spe = self.steps_per_epoch();
        let mut out = Vec::with_capacity((end - from) as usize);
        let mut epoch_batches: Option<(u64, Vec<Vec<usize>>)> = None;
        for step in from..end {
            let local = step - start;
            let (epoch, k) = (local / spe, (local % spe) as usize);
            if epoch_batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let b = shard::rank_batches(
                    self.train.len(),
                    self.cfg.seed,
                    epoch,
                    self.world.rank,
                    self.world.size,
                    self.cfg.batch,
                )?;
                epoch_batches = Some((epoch, b));
            }
            let batches = &epoch_batches.as_ref().expect("set above").1;
            out.push(batches[k].iter().map(|&i| self.train[i]).collect());
        }
        Ok(out)
    }

    fn hooked(&self) -> bool {
        self.hook_rank.is_none_or(|r| r == self.world.rank)
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
        idx: &impl ParamIndex,
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
                    idx,
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
                        self.be, &self.net, params, grads, idx, volumes, pos, &masks, &opts, None,
                    );
                }
                let targets = self.targets(params, subjects, volumes);
                objective::mevp_with(
                    self.be, &self.net, params, grads, idx, &targets, tokens, pos, &masks, &opts,
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
        // Each global chunk is split over the ranks as training batches are; a chunk's loss is
        // the subject-weighted mean of its pieces' (pieces are even, so triplet pairs stay).
        let per = self.cfg.batch / self.world.size;
        let (mut sum, mut batches) = (0.0, 0);
        for chunk in self.val[..usable].chunks(self.cfg.batch) {
            let lo = (self.world.rank * per).min(chunk.len());
            let hi = ((self.world.rank + 1) * per).min(chunk.len());
            let mine = &chunk[lo..hi];
            let mut piece = [0.0];
            if !mine.is_empty() {
                let volumes = self.read_volumes(mine)?;
                let loss = self.batch_loss(
                    &self.layout,
                    stage,
                    params,
                    None,
                    mine,
                    &volumes,
                    u64::MAX,
                    "val-mask",
                    consts,
                );
                piece[0] = loss * (mine.len() as f64 / chunk.len() as f64);
            }
            self.world.all_reduce_f64(&mut piece, Op::Sum);
            sum += piece[0];
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

    /// Writes a checkpoint from rank 0 once every rank has got here (every rank calls it).
    fn save(&self, path: &Path, stage: Stage, state: &State<B>) -> Result<()> {
        self.world.barrier();
        if !self.world.is_root() {
            return Ok(());
        }
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

    /// Runs every remaining step of the plan from `state`. Every rank runs it; the decisions
    /// (stop on a non-finite value, a signal, early stopping) come from values all-reduced
    /// each step, so the ranks always take them together.
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
        let (world, be) = (self.world, self.be);
        let root = world.is_root();
        let mut metrics = match root {
            true => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.out.join("metrics.jsonl"))
                    .with_context(|| {
                        format!("{}: cannot open metrics.jsonl", self.out.display())
                    })?,
            ),
            false => None,
        };
        let mut done_here = 0u64;
        // A bar on rank 0's terminal (log lines print above it); nothing in batch logs.
        let plan = self.plan();
        let bar = match root {
            true => crate::progress::bar(plan.len() as u64 * total, "pretrain"),
            false => indicatif::ProgressBar::hidden(),
        };
        bar.set_position(state.step);
        let quiet = self.quiet || !root;
        let say = |line: String| {
            if quiet {
            } else if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        };
        // This rank's seconds waiting for data, and in whole steps, reported at the end.
        let (mut waited, mut stepped) = (0.0f64, 0.0f64);
        for &(stage, start) in &plan {
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
            let reader = Prefetch::start(
                self.corpus.path(),
                self.schedule(start, state.step, end)?,
                self.unreadable,
            );
            while state.step < end {
                if self.stop_after.is_some_and(|k| done_here >= k) {
                    return Ok(());
                }
                let local = state.step - start;
                let epoch = local / spe;
                let (batch, data_s) = reader.next()?;
                let (subjects, volumes) = (batch.subjects, batch.volumes);
                let t1 = Instant::now();
                be.fill(be.view_mut(&mut state.grads, part.clone()), 0.0);
                // With several ranks the gradient's buckets are summed while backward runs.
                let overlap = self.grad_comm.as_ref().map(|r| {
                    let floats = self.cfg.allreduce_bucket_kb * 1024 / 4;
                    Overlap::new(&self.layout, r, part.clone(), floats)
                });
                let mut loss = match &overlap {
                    Some(o) => self.batch_loss(
                        o,
                        stage,
                        &state.params,
                        Some(&mut state.grads),
                        &subjects,
                        &volumes,
                        epoch,
                        "mask",
                        consts.as_ref(),
                    ),
                    None => self.batch_loss(
                        &self.layout,
                        stage,
                        &state.params,
                        Some(&mut state.grads),
                        &subjects,
                        &volumes,
                        epoch,
                        "mask",
                        consts.as_ref(),
                    ),
                };
                if self.hooked() && self.poison_step == Some(state.step + 1) {
                    loss = f64::NAN;
                }
                if self.hooked() && self.fail_step == Some(state.step + 1) {
                    bail!(
                        "step {}: failure injected by MTX_TEST_FAIL_AT_STEP",
                        state.step + 1
                    );
                }
                // Each rank checks its own values before they are mixed (the buckets as they
                // leave), so the message can name the rank; one small reduction then carries
                // every per-step decision.
                // When this rank's backward ended (same clock on one node; across nodes the
                // clocks' offset adds to wait_slowest_s).
                let backward_end = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let (grad_bad, times, local_sq) = match &overlap {
                    Some(o) => {
                        let (bad, times) = o.finish(be, &mut state.grads);
                        (bad, times, 0.0)
                    }
                    None => {
                        let sq = be.sum_squares(be.view(&state.grads, part.clone()));
                        (!sq.is_finite(), Default::default(), sq)
                    }
                };
                let bad = !loss.is_finite() || grad_bad;
                let mut sums = [
                    loss,
                    f64::from(u8::from(bad)),
                    f64::from(u8::from(self.stop_signal.load(Ordering::Relaxed))),
                ];
                let first_bad = if bad {
                    -(world.rank as f64)
                } else {
                    f64::NEG_INFINITY
                };
                let mut maxes = [data_s, first_bad, backward_end];
                world.all_reduce_f64(&mut sums, Op::Sum);
                world.all_reduce_f64(&mut maxes, Op::Max);
                if sums[1] > 0.0 {
                    let rank = -maxes[1];
                    let what = if loss.is_finite() {
                        "a non-finite gradient".to_string()
                    } else {
                        format!("loss {loss}")
                    };
                    let last = checkpoint::latest_complete(&self.out)?;
                    let on_rank = if world.size > 1 {
                        format!(" on rank {rank}")
                    } else {
                        String::new()
                    };
                    let detail = if world.rank as f64 == rank {
                        format!(" ({what})")
                    } else {
                        String::new()
                    };
                    return Err(Collective::new(
                        world,
                        1,
                        format!(
                            "step {}: non-finite {}{on_rank}{detail}; the last good checkpoint is {}",
                            state.step + 1,
                            if bad && loss.is_finite() { "gradient" } else { "loss" },
                            last.map_or("none".to_string(), |p| p.display().to_string())
                        ),
                    )
                    .into());
                }
                let loss = sums[0] / world.size as f64;
                let signalled = sums[2] > 0.0;
                // Gradients of the global batch: the sum over ranks of per-rank means, / ranks.
                let norm = if overlap.is_some() {
                    be.scale(
                        1.0 / world.size as f32,
                        be.view_mut(&mut state.grads, part.clone()),
                    );
                    be.sum_squares(be.view(&state.grads, part.clone())).sqrt()
                } else {
                    local_sq.sqrt()
                };
                let wait_slowest_s = (maxes[2] - backward_end).clamp(0.0, times.exposed_s);
                let (comm_s, comm_exposed_s) = (times.comm_s, times.exposed_s - wait_slowest_s);
                let comm_buckets_early = times.early;
                // clip 0 turns clipping off (train/config.rs).
                if self.cfg.clip > 0.0 && norm > self.cfg.clip {
                    be.scale(
                        (self.cfg.clip / norm) as f32,
                        be.view_mut(&mut state.grads, part.clone()),
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
                    let grads = be.view(&state.grads, part.clone());
                    let (mut pm, mut mm, mut vm) = (
                        be.view_mut(&mut state.params, part.clone()),
                        be.view_mut(&mut state.m, part.clone()),
                        be.view_mut(&mut state.v, part.clone()),
                    );
                    be.adam(
                        &h,
                        be.reborrow_mut(&mut pm),
                        grads,
                        be.reborrow_mut(&mut mm),
                        be.reborrow_mut(&mut vm),
                    );
                }
                let compute_s = t1.elapsed().as_secs_f64() - times.exposed_s;
                waited += data_s;
                stepped += data_s + t1.elapsed().as_secs_f64();
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
                    subjects_per_s: self.cfg.batch as f64
                        / (maxes[0] + compute_s + times.exposed_s).max(1e-9),
                    data_s,
                    compute_s,
                    data_wait_s: maxes[0],
                    comm_s,
                    comm_exposed_s,
                    wait_slowest_s,
                    comm_buckets_early,
                    val_loss,
                };
                if let Some(m) = metrics.as_mut() {
                    writeln!(m, "{}", serde_json::to_string(&line)?).with_context(|| {
                        format!("{}: cannot write metrics.jsonl", self.out.display())
                    })?;
                }
                bar.set_position(state.step);
                bar.set_message(format!("{} loss {loss:.4}", stage.name()));
                if state.step % self.cfg.log_every == 0 || val_loss.is_some() {
                    say(format!(
                        "step {:>6} {:<7} epoch {:>3} loss {:.5} lr {:.2e} |g| {:.3} {:.2} subj/s data {:.2}s compute {:.2}s{}{}",
                        state.step,
                        stage.name(),
                        epoch,
                        loss,
                        lr,
                        norm,
                        line.subjects_per_s,
                        maxes[0],
                        compute_s,
                        if world.size > 1 {
                            format!(
                                " comm {comm_s:.3}s ({comm_exposed_s:.3}s exposed, \
                                 {wait_slowest_s:.3}s waiting for the slowest rank)"
                            )
                        } else {
                            String::new()
                        },
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
                if state.step % self.cfg.checkpoint_every == 0
                    || state.step == end
                    || stop
                    || signalled
                {
                    self.save(
                        &self.out.join(checkpoint::step_file_name(state.step)),
                        stage,
                        state,
                    )?;
                    if root {
                        checkpoint::prune(&self.out, self.cfg.keep_last)?;
                    }
                }
                if signalled {
                    bar.abandon();
                    return Err(Collective::new(
                        world,
                        EXIT_INTERRUPTED,
                        format!(
                            "stopped by a signal after step {}: {} is complete; continue with \
                             --resume auto (exit status {EXIT_INTERRUPTED})",
                            state.step,
                            self.out
                                .join(checkpoint::step_file_name(state.step))
                                .display()
                        ),
                    )
                    .into());
                }
                if stop {
                    say(format!(
                        "{}: early stop after {} epochs without improvement",
                        stage.name(),
                        state.stale_epochs
                    ));
                    state.step = end;
                    self.save(
                        &self.out.join(checkpoint::step_file_name(state.step)),
                        stage,
                        state,
                    )?;
                }
            }
            if stage == *plan.last().map(|(s, _)| s).unwrap_or(&stage) {
                self.save(&self.out.join("final.h5"), stage, state)?;
            }
        }
        bar.finish();
        self.report_waits(waited, stepped, &say);
        Ok(())
    }

    /// One line per rank (from rank 0): its time waiting for data, as a share of its steps.
    fn report_waits(&self, waited: f64, stepped: f64, say: &dyn Fn(String)) {
        let n = self.world.size;
        let mut all = vec![0.0; 2 * n];
        all[2 * self.world.rank] = waited;
        all[2 * self.world.rank + 1] = stepped;
        self.world.all_reduce_f64(&mut all, Op::Sum);
        for r in 0..n {
            let (w, s) = (all[2 * r], all[2 * r + 1]);
            say(format!(
                "rank {r}: waited {w:.2} s for data over {s:.1} s of steps ({:.2} %)",
                100.0 * w / s.max(1e-9)
            ));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `mtx-hpc pretrain` on every rank: the job's world, then [`run_rank`]. An error that not
/// every rank reaches together ends the whole job from the rank that has it (MPI_Abort), so
/// nobody is left waiting in a collective.
pub fn run(args: &crate::cli::PretrainArgs) -> Result<()> {
    let world = World::init()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGUSR1, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install the signal handlers")?;
    }
    match on_device(args, &world, stop) {
        Ok(()) => Ok(()),
        Err(e) if world.size == 1 => Err(e),
        Err(e) if e.is::<Collective>() => {
            // Every rank is here together. Rank 0 says why now, and no rank exits before it
            // has: a launcher (mpirun, srun --kill-on-bad-exit) kills the others as soon as
            // one rank exits non-zero, which cut rank 0 off mid-message (and, before this
            // barrier, could cut it off while it was still writing the checkpoint).
            let mut c = e.downcast::<Collective>().expect("checked");
            if c.report {
                crate::cli::report_collective(&c);
                c.report = false;
            }
            world.barrier();
            Err(c.into())
        }
        Err(e) => {
            eprintln!("error on rank {} of {}: {e:#}", world.rank, world.size);
            world.abort(1)
        }
    }
}

/// Picks this rank's device (`--device`), then runs on it.
fn on_device(args: &crate::cli::PretrainArgs, world: &World, stop: Arc<AtomicBool>) -> Result<()> {
    use crate::backend::device::{self, Device};
    let chosen = device::resolve(args.device, world.local_rank)?;
    if let (Some(notice), true) = (&chosen.notice, world.is_root()) {
        println!("{notice}");
    }
    // The way gradients are summed is chosen once per run, by every rank together.
    match chosen.device {
        Device::Cpu => {
            let reducer = grad_comm::for_cpu(args.grad_comm, world)?;
            run_rank(&crate::backend::cpu::Cpu, args, world, stop, reducer)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal, name, .. } => {
            let be = crate::backend::cuda::Cuda::new(
                ordinal,
                crate::backend::cuda::CudaOptions { tf32: args.tf32 },
            )?;
            println!("{}: GPU {ordinal} ({name})", world.describe());
            let reducer = grad_comm::for_cuda(args.grad_comm, world, &be)?;
            run_rank(&be, args, world, stop, reducer)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => bail!("this binary was built without the `cuda` feature"),
    }
}

/// The run configuration: the file, then the command line's overrides, validated for this
/// world (every rank checks alike, so a refusal is collective).
fn effective_config(args: &crate::cli::PretrainArgs, world: &World) -> Result<RunConfig> {
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
    let refuse = |e: anyhow::Error| Collective::new(world, 1, format!("{e:#}"));
    cfg.validate().map_err(refuse)?;
    let per = shard::per_rank_batch(cfg.batch, world.size).map_err(refuse)?;
    if per % 2 != 0 {
        return Err(refuse(anyhow::anyhow!(
            "the batch {} over {} ranks gives {per} subjects per rank: it must be even (the \
             triplet pairs subjects within a rank); use a batch that is an even multiple of \
             the rank count",
            cfg.batch,
            world.size
        ))
        .into());
    }
    Ok(cfg)
}

/// Copies the corpus into `dir` once per node (local rank 0; the others wait) unless a copy
/// with the same checksum is there; returns the copy's path.
fn stage_corpus(world: &World, corpus: &Path, checksum: &str, dir: &Path) -> Result<PathBuf> {
    let name = corpus
        .file_name()
        .with_context(|| format!("{}: not a file name", corpus.display()))?;
    let target = dir.join(name);
    if world.local_rank == 0 {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the staging folder", dir.display()))?;
        let fresh = target.exists() && crate::io::file_checksum(&target)? == checksum;
        if !fresh {
            let t = Instant::now();
            let tmp = dir.join(format!(".{}.staging", name.to_string_lossy()));
            std::fs::copy(corpus, &tmp).with_context(|| {
                format!("cannot copy {} to {}", corpus.display(), tmp.display())
            })?;
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("{}: cannot rename into place", target.display()))?;
            println!(
                "rank {}: staged {} to {} in {:.1} s",
                world.rank,
                corpus.display(),
                target.display(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    world.node_barrier();
    Ok(target)
}

/// Worker threads of this rank: SLURM_CPUS_PER_TASK under Slurm, else `--threads`, else the
/// node's cores shared among its ranks.
fn threads_per_rank(args: &crate::cli::PretrainArgs, world: &World, slurm: &SlurmEnv) -> usize {
    slurm
        .cpus_per_task()
        .or(args.threads)
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores / world.local_size.max(1)
        })
        .max(1)
}

/// Everything one rank does: configuration, run folder (rank 0), resume, the same
/// parameters on every rank, then the loop.
fn run_rank<B: Backend>(
    be: &B,
    args: &crate::cli::PretrainArgs,
    world: &World,
    stop_signal: Arc<AtomicBool>,
    grad_comm: Option<Reducer>,
) -> Result<()> {
    let slurm = SlurmEnv::from_env();
    let threads = threads_per_rank(args, world, &slurm);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("cannot set up the worker threads")?;
    let cfg = effective_config(args, world)?;
    let root = world.is_root();
    // Rank 0 reads the whole corpus file once for its checksum; the others take it.
    let mut checksum = match root {
        true => crate::io::file_checksum(&args.corpus)?.into_bytes(),
        false => Vec::new(),
    };
    world.broadcast_bytes(&mut checksum);
    let corpus_checksum = String::from_utf8(checksum).context("corpus checksum")?;
    let corpus_path = match &args.stage_corpus {
        Some(dir) => stage_corpus(world, &args.corpus, &corpus_checksum, dir)?,
        None => args.corpus.clone(),
    };
    let corpus = Corpus::open(&corpus_path)?;
    let model = cfg.model_config();
    model
        .check_grid(corpus.grid(), corpus.spacing())
        .with_context(|| format!("{}", args.corpus.display()))?;

    let out = &args.out;
    if root {
        if !out.exists() {
            std::fs::create_dir(out).with_context(|| {
                format!(
                    "{}: cannot create the run folder (does its parent exist?)",
                    out.display()
                )
            })?;
        }
        let holds_run =
            out.join("config.toml").exists() || checkpoint::latest_complete(out)?.is_some();
        if holds_run && args.resume.is_none() && !args.force {
            bail!(
                "{}: holds another run (config.toml or checkpoints): use --resume auto to \
                 continue it, --force to start over in it, or another --out",
                out.display()
            );
        }
    }
    let layout = Layout::new(&model);
    let trainer = Trainer {
        be,
        net: Net::new(&model),
        corpus_checksum,
        train: corpus.train_indices(),
        val: corpus.val_indices(),
        corpus: &corpus,
        out: out.clone(),
        layout,
        model,
        cfg,
        // Test hooks, documented in docs/CLI.md's pretrain section.
        stop_after: env_u64("MTX_TEST_STOP_AFTER"),
        poison_step: env_u64("MTX_TEST_NAN_AT_STEP"),
        fail_step: env_u64("MTX_TEST_FAIL_AT_STEP"),
        hook_rank: env_u64("MTX_TEST_RANK").map(|r| r as usize),
        unreadable: env_u64("MTX_TEST_UNREADABLE_SUBJECT").map(|s| s as usize),
        quiet: false,
        world,
        stop_signal,
        grad_comm,
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
    // Rank 0 picks the checkpoint (the folder changes once it writes); every rank reads it.
    let mut pick = match (root, args.resume.as_deref()) {
        (true, Some("auto")) => checkpoint::latest_complete(out)?
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        (true, Some(file)) => file.to_string(),
        _ => String::new(),
    }
    .into_bytes();
    world.barrier();
    world.broadcast_bytes(&mut pick);
    let resume_from =
        (!pick.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&pick).as_ref()));
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
            if root {
                println!("resuming from {} (step {})", path.display(), ckpt.meta.step);
            }
            trainer.resume_state(&ckpt)?
        }
        None => {
            if args.resume.is_some() && root {
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
        let n = ours.len();
        trainer
            .be
            .download(trainer.be.view(&state.params, 0..n), &mut ours);
        ours[enc.clone()].copy_from_slice(&theirs[enc]);
        state.params = trainer.be.upload(&ours);
        if root {
            println!("encoder from {}", path.display());
        }
    }
    // Every rank starts from rank 0's parameters and moments.
    if world.size > 1 {
        let n = trainer.layout.total();
        for buf in [&mut state.params, &mut state.m, &mut state.v] {
            let mut host = vec![0.0f32; n];
            trainer.be.download(trainer.be.view(buf, 0..n), &mut host);
            world.broadcast_f32(&mut host);
            *buf = trainer.be.upload(&host);
        }
    }
    if root {
        if let Some(job) = slurm.describe() {
            println!("{job}");
        }
        println!(
            "{} rank(s), {threads} thread(s) per rank, per-rank batch {}",
            world.size,
            trainer.cfg.batch / world.size
        );
        if let Some(r) = &trainer.grad_comm {
            println!("{}", r.describe(world));
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
    }
    trainer.run(&mut state)?;
    if root {
        println!(
            "done: step {}; checkpoints in {}",
            state.step,
            out.display()
        );
    }
    Ok(())
}
