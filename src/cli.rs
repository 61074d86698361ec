//! The command line: clap definitions and dispatch, nothing else. Each subcommand's work lives
//! in the library module named after it.
use crate::data::preprocess::{Align, Normalise};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "mtx-hpc",
    term_width = 100,
    version,
    about = "Pretrain the Medical Transformer on brain MRI, on clusters",
    long_about = "Pretrain the Medical Transformer (a 2-D slice encoder plus a small transformer \
over the three anatomical planes) on brain MRI, data-parallel over MPI ranks, and evaluate it \
on downstream tasks.\n\nA corpus is built in two steps: `synth` (or your own NIfTI files and a \
manifest) then `pack`; `inspect` shows what any of our files holds.",
    after_help = "Examples:\n  mtx-hpc synth --cohort healthy --subjects 16 --out data/healthy\n  \
mtx-hpc pack --manifest data/healthy/manifest.csv --out data/healthy.h5\n  \
mtx-hpc inspect data/healthy.h5 --subject HC0000 --png hc0000.png"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Synth(SynthArgs),
    Pack(PackArgs),
    Inspect(InspectArgs),
    Pretrain(PretrainArgs),
    Finetune(crate::downstream::finetune::FinetuneArgs),
    Predict(crate::downstream::predict::PredictArgs),
    Embed(crate::downstream::predict::EmbedArgs),
    Report(crate::downstream::report::ReportArgs),
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Benchmarks for docs/PERFORMANCE.md (timings belong there, not in tests).
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    Step(BenchStepArgs),
    Scaling(crate::train::scaling::ScalingArgs),
}

/// Time optimizer steps of one stage on random volumes (no corpus needed).
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  mtx-hpc bench step --preset paper --batch 4 --stage mevp --threads 2\n  \
mtx-hpc bench step --preset paper --batch 4 --stage triplet --threads 1\n  \
mtx-hpc bench step --preset paper --batch 4 --stage mevp-trainable --threads 2\n  \
mtx-hpc bench step --preset paper --batch 4 --stage segmentation --threads 2"
)]
pub struct BenchStepArgs {
    #[arg(long, value_enum, default_value_t = crate::model::Preset::Paper)]
    pub preset: crate::model::Preset,
    /// Subjects per step (even).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// triplet (encoder forward + backward), mevp (frozen encoder, targets not cached),
    /// mevp-trainable (encoder trained too: forward with tape, backward through it), or a
    /// fine-tuning step of diagnosis, age or segmentation (encoder trained).
    #[arg(long, default_value = "mevp", value_parser = ["triplet", "mevp", "mevp-trainable", "diagnosis", "age", "segmentation"])]
    pub stage: String,
    /// Timed steps after one warm-up step.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where to compute: auto (a CUDA GPU when present, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value_t = crate::backend::device::DeviceRequest::Auto)]
    pub device: crate::backend::device::DeviceRequest,
    /// With a CUDA GPU: let cuBLAS use TF32 tensor cores for f32 GEMMs.
    #[arg(long)]
    pub tf32: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cohort {
    /// Cognitively normal adults aged 20-90, no lesions: the pretraining cohort.
    Healthy,
    /// CN and AD subjects, a fraction with tumours: the downstream cohort.
    Clinical,
}

/// Generate a synthetic cohort of T1-weighted brain MRI with labels the images really carry.
#[derive(Args, Debug, Clone)]
#[command(
    long_about = "Generate a synthetic cohort of T1-weighted brain MRI as .nii.gz files plus \
DIR/manifest.csv. Age drives atrophy (ventricles grow, cortex thins, sulci widen); AD adds \
medial-temporal and global atrophy on top of age; tumours carry BraTS labels (1 necrotic core, \
2 oedema, 4 enhancing rim) in a second NIfTI; site shifts contrast and noise. Each file has a \
random but valid affine (flips, permutations, small oblique rotations, anisotropic voxels, \
int16 with a scale slope), so preprocessing has real work to do. The same seed gives the same \
files.",
    after_help = "Examples:\n  mtx-hpc synth --cohort healthy --subjects 64 --out data/healthy\n  \
mtx-hpc synth --cohort clinical --subjects 40 --tumour-fraction 0.5 --out data/clinical\n  \
mtx-hpc synth --cohort healthy --subjects 8 --out data/t1 --template /usr/share/mricron/templates/ch2bet.nii.gz"
)]
pub struct SynthArgs {
    /// Which cohort to generate.
    #[arg(long, value_enum)]
    pub cohort: Cohort,
    /// Number of subjects.
    #[arg(long)]
    pub subjects: usize,
    /// Output folder (created if missing; existing subject files are an error unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of clinical subjects with a tumour.
    #[arg(long, default_value_t = 0.3)]
    pub tumour_fraction: f64,
    /// Warp this real T1 (e.g. Colin27 ch2bet.nii.gz) instead of the procedural phantom.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Overwrite files already in the output folder.
    #[arg(long)]
    pub force: bool,
}

/// Preprocess NIfTI volumes onto the model's grid and write an HDF5 corpus.
#[derive(Args, Debug, Clone)]
#[command(
    long_about = "Preprocess NIfTI volumes onto the model's grid and write one HDF5 corpus: \
reorient to RAS (sform, else qform, else voxel sizes), resample to --spacing (anti-aliased when \
downsampling; label maps keep small labels), place the foreground in a --grid box, clip to the \
0.5-99.5 percentiles inside the foreground and scale to [0,1], store float16. The file appears \
only when complete (temporary name, fsync, rename). Manifest columns: subject_id,image \
required; session,age,sex,diagnosis,site,segmentation optional; paths relative to the CSV; \
diagnosis one of CN, MCI, AD.",
    after_help = "Examples:\n  mtx-hpc pack --manifest data/healthy/manifest.csv --out data/healthy.h5\n  \
mtx-hpc pack --dir scans/ --out scans.h5 --spacing 3 --grid 64,76,64\n  \
mtx-hpc pack --manifest mni/manifest.csv --align world --out mni.h5 --skip-bad"
)]
pub struct PackArgs {
    /// Manifest CSV listing the subjects.
    #[arg(long, conflicts_with = "dir", required_unless_present = "dir")]
    pub manifest: Option<PathBuf>,
    /// Folder of .nii/.nii.gz files, one subject each (id = file name without extension).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Output corpus (.h5).
    #[arg(long)]
    pub out: PathBuf,
    /// Target voxel size in millimetres.
    #[arg(long, default_value_t = 2.0)]
    pub spacing: f64,
    /// Target grid X,Y,Z in voxels (the paper preset: 96,114,96).
    #[arg(long, default_value = "96,114,96", value_parser = parse_grid)]
    pub grid: [usize; 3],
    /// How to place the volume in the grid.
    #[arg(long, value_enum, default_value_t = Align::Centre)]
    pub align: Align,
    /// Intensity normalisation.
    #[arg(long, value_enum, default_value_t = Normalise::Minmax)]
    pub normalise: Normalise,
    /// Fraction of subjects in the validation split.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// For 4-D inputs: which volume to take (otherwise a 4-D input is an error).
    #[arg(long)]
    pub volume: Option<usize>,
    /// Skip subjects that fail, list them with the reason, and write the rest.
    #[arg(long)]
    pub skip_bad: bool,
    /// Overwrite an existing output corpus.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Show what a corpus, a checkpoint or a NIfTI file holds.
#[derive(Args, Debug, Clone)]
#[command(
    long_about = "Show what a file holds: for a corpus its format, grid, spacing, subjects, \
label statistics and split sizes; for a checkpoint its stage, step, epoch, best validation \
loss, preset, parameter counts, every tensor (name, shape, L2 norm) and the model and run \
configurations; for a NIfTI file its header, orientation codes, shape, voxel size and intensity \
range. With --subject and --png, render the subject's three mid-planes side \
by side (segmentation as a coloured overlay): look at your preprocessing.",
    after_help = "Examples:\n  mtx-hpc inspect data/healthy.h5\n  \
mtx-hpc inspect data/healthy/HC0000.nii.gz\n  \
mtx-hpc inspect run/best.h5\n  \
mtx-hpc inspect data/clinical.h5 --subject CL0003 --png cl0003.png"
)]
pub struct InspectArgs {
    /// A corpus or checkpoint (.h5), or a NIfTI file (.nii, .nii.gz).
    pub path: PathBuf,
    /// Subject id (corpus only).
    #[arg(long)]
    pub subject: Option<String>,
    /// Write the subject's three mid-planes to this PNG (needs --subject).
    #[arg(long, requires = "subject")]
    pub png: Option<PathBuf>,
}

/// Pretrain the Medical Transformer on a corpus: triplet (encoder) then MEVP (transformer).
#[derive(Args, Debug, Clone)]
#[command(
    long_about = "Pretrain the Medical Transformer on a packed corpus, on the CPU. Stage 1 \
(triplet) trains the slice encoder: anchor = a subject's slices, positive = the same slices after \
a random monotone intensity curve, negative = the paired subject's slices. Stage 2 (MEVP) freezes \
the encoder and trains the transformer to predict masked slice vectors. Settings come from \
--config (TOML; unknown keys are an error) with the options below overriding it; the effective \
configuration is printed and saved as RUN_DIR/config.toml. RUN_DIR receives metrics.jsonl (one \
JSON object per step), ckpt-stepNNNNNNNN.h5 (the last few), best.h5 (best validation loss of the \
last stage) and final.h5. Every random draw is keyed by (seed, epoch, subject, purpose), so \
--resume continues exactly where a run stopped.",
    after_help = "Examples:\n  mtx-hpc pretrain --corpus data/healthy.h5 --out runs/r1 --preset paper --epochs 50\n  \
mtx-hpc pretrain --corpus tiny.h5 --out runs/t --preset tiny --steps 20 --batch 2\n  \
mtx-hpc pretrain --corpus data/healthy.h5 --out runs/r1 --resume auto\n  \
mtx-hpc pretrain --corpus data/healthy.h5 --out runs/r2 --stage mevp --init-encoder runs/r1/best.h5\n\n\
Ranks: started plainly it is one process; under `mpirun -n N` or `srun --mpi=pmix` it runs N \
data-parallel ranks (the global batch split evenly, an even number of subjects per rank), rank 0 \
writing the run folder. On SIGUSR1 or SIGTERM it finishes the step, writes a checkpoint and exits \
with status 75; `--resume auto` continues. Any rank's error ends the whole job.\n\n\
Test hooks (environment, for the test suite): MTX_TEST_STOP_AFTER=N stops as if killed after N \
steps; MTX_TEST_NAN_AT_STEP=N makes step N's loss NaN; MTX_TEST_FAIL_AT_STEP=N fails at step N; \
MTX_TEST_UNREADABLE_SUBJECT=I makes corpus subject I unreadable; MTX_TEST_RANK=R applies these \
on rank R only."
)]
pub struct PretrainArgs {
    /// The corpus to train on (from `mtx-hpc pack`; its grid must match the preset).
    #[arg(long)]
    pub corpus: PathBuf,
    /// Run folder (created if missing; its parent must exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Run configuration (TOML); options below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model size: paper (96x114x96, 2 mm), small (64x76x64, 3 mm), tiny (32x38x32, 6 mm).
    #[arg(long, value_enum)]
    pub preset: Option<crate::model::Preset>,
    /// Which stages to run.
    #[arg(long, value_enum)]
    pub stage: Option<crate::train::Stages>,
    /// Steps per stage (overrides --epochs; step numbers continue across stages).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Epochs per stage (an epoch is floor(training subjects / batch) steps).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Global batch in subjects (even: the triplet pairs subjects).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate of every stage this run performs.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of every random draw.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to compute: auto takes a CUDA GPU (GPU local_rank % visible count) when a driver
    /// and a GPU are present, else the CPU with a notice; cuda without one is an error.
    #[arg(long, value_enum, default_value_t = crate::backend::device::DeviceRequest::Auto)]
    pub device: crate::backend::device::DeviceRequest,
    /// With a CUDA GPU: let cuBLAS use TF32 tensor cores for f32 GEMMs (faster, ~1e-3 error).
    #[arg(long)]
    pub tf32: bool,
    /// How gradients are summed over ranks: nccl in GPU memory (builds with the `nccl`
    /// feature; every rank on a GPU of its own), mpi from host copies (any device), or auto:
    /// nccl when usable, else mpi (with a notice on GPUs).
    #[arg(long, value_enum, default_value_t = crate::train::grad_comm::GradCommRequest::Auto)]
    pub grad_comm: crate::train::grad_comm::GradCommRequest,
    /// Continue from the newest complete checkpoint in RUN_DIR (auto) or from a file.
    #[arg(long)]
    pub resume: Option<String>,
    /// Start from the encoder of another run's checkpoint.
    #[arg(long)]
    pub init_encoder: Option<PathBuf>,
    /// Reuse a run folder that holds another run (its checkpoints may be replaced).
    #[arg(long)]
    pub force: bool,
    /// Worker threads per rank (SLURM_CPUS_PER_TASK wins when set; default: the node's cores
    /// shared among its ranks).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Copy the corpus into this node-local folder (e.g. $TMPDIR) once per node and read it
    /// there; an up-to-date copy (same checksum) is reused.
    #[arg(long, value_name = "DIR")]
    pub stage_corpus: Option<PathBuf>,
}

fn parse_grid(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let bad = || format!("expected three positive integers X,Y,Z (like 96,114,96), got '{s}'");
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut grid = [0usize; 3];
    for (g, p) in grid.iter_mut().zip(&parts) {
        *g = p.parse().map_err(|_| bad())?;
        if *g == 0 {
            return Err(bad());
        }
    }
    Ok(grid)
}

/// Parses the command line, runs the subcommand, prints any error once with its causes.
/// How a collective stop is said: a signal stop as a plain line, anything else as an error.
pub fn report_collective(c: &crate::dist::Collective) {
    if c.code == crate::train::pretrain::EXIT_INTERRUPTED {
        eprintln!("{}", c.message);
    } else {
        eprintln!("error: {}", c.message);
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Synth(a) => crate::data::synth::run(a),
        Command::Pack(a) => crate::data::pack::run(a),
        Command::Inspect(a) => crate::data::inspect::run(a),
        Command::Pretrain(a) => crate::train::pretrain::run(a),
        Command::Finetune(a) => crate::downstream::finetune::run(a),
        Command::Predict(a) => crate::downstream::predict::run_predict(a),
        Command::Embed(a) => crate::downstream::predict::run_embed(a),
        Command::Report(a) => crate::downstream::report::run(a),
        Command::Bench(BenchCommand::Step(a)) => crate::train::bench::run(a),
        Command::Bench(BenchCommand::Scaling(a)) => crate::train::scaling::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Reached by every rank together: rank 0 says it, all exit with its status.
        Err(e) if e.is::<crate::dist::Collective>() => {
            let c = e
                .downcast_ref::<crate::dist::Collective>()
                .expect("checked");
            if c.report {
                report_collective(c);
            }
            ExitCode::from(c.code)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
