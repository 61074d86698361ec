//! `mtx-hpc predict` (a fine-tuned model on new scans: packed in memory exactly as `pack`
//! packed the training corpus, answers written back on the scans' own grids) and `mtx-hpc
//! embed` (the slice vectors and pooled vector of every subject of a corpus, for analysis
//! elsewhere).
use super::Task;
use super::finetune::{FINETUNED, Model, TaskRecord, write_mask};
use crate::backend::Backend;
use crate::backend::device::DeviceRequest;
use crate::data::corpus::Corpus;
use crate::data::manifest;
use crate::data::writeback;
use crate::io::AtomicFile;
use crate::model::objective::Net;
use crate::model::task;
use crate::model::{Layout, ModelConfig, Plane};
use crate::train::checkpoint::Checkpoint;
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Apply a fine-tuned model to new NIfTI scans.
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Apply a fine-tuned model to new NIfTI scans (brain age, diagnosis, tumour masks)",
    long_about = "Apply a model from `mtx-hpc finetune` to new scans. Each scan is packed in \
memory exactly as `pack` packed the corpus the model was trained on (the parameters are stored \
in the fine-tuned checkpoint), then: diagnosis writes the probability of the positive class and \
the class at the threshold chosen during fine-tuning; age writes the predicted age and, when \
the true age is known (--age, or the manifest's age column), the brain-age gap and its \
bias-corrected form; segmentation writes each scan's tumour mask (BraTS codes 0, 1, 2, 4) as \
OUT/<id>_seg.nii.gz on the scan's own grid and affine, so a viewer shows it over the input.\n\n\
The answers are in OUT/predictions.csv, one row per scan.",
    after_help = "Examples:\n  mtx-hpc predict --checkpoint ft/age/finetuned.h5 --input \
sub-01.nii.gz --age 71 --out pred\n  mtx-hpc predict --checkpoint ft/seg --manifest new.csv \
--out pred"
)]
pub struct PredictArgs {
    /// A fine-tuned checkpoint (finetuned.h5), or the fine-tuning run folder holding it.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// NIfTI scans (.nii, .nii.gz, .hdr); the subject id is the file name without extension.
    #[arg(long, num_args = 1.., required_unless_present = "manifest", conflicts_with = "manifest")]
    pub input: Vec<PathBuf>,
    /// A manifest CSV (the format `pack` reads: subject_id, image, optional age...).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// True age of the --input scans (for the brain-age gap).
    #[arg(long)]
    pub age: Option<f64>,
    /// Output folder (created; existing files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceRequest::Auto)]
    pub device: DeviceRequest,
}

/// Write every subject's slice vectors and pooled vector.
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Write each subject's slice vectors and pooled vector to HDF5",
    long_about = "Run every subject of a corpus through a checkpoint's encoder and transformer \
and write, per subject, the encoder's slice vectors of each plane and the pooled vector (the \
mean of each plane's contextualised tokens, the three planes concatenated: what the diagnosis \
and age heads read). Works with a pretraining or a fine-tuned checkpoint.\n\nOutput datasets: \
/axial [N, Z, D], /sagittal [N, X, D], /coronal [N, Y, D] (float32), /pooled [N, 3D], \
/subjects/id and /subjects/session (strings), in corpus order.",
    after_help = "Example:\n  mtx-hpc embed --checkpoint run/best.h5 --corpus clinical.h5 \
--out clinical-embeddings.h5"
)]
pub struct EmbedArgs {
    /// A pretraining or fine-tuned checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub corpus: PathBuf,
    /// The HDF5 file to write (replaced if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// Subjects per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = DeviceRequest::Auto)]
    pub device: DeviceRequest,
}

/// A fine-tuned checkpoint with its task record and parameters.
pub(crate) struct Finetuned {
    pub record: TaskRecord,
    pub model: Model,
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
}

impl Finetuned {
    pub fn open(path: &Path) -> Result<Self> {
        let path = if path.is_dir() {
            path.join(FINETUNED)
        } else {
            path.to_path_buf()
        };
        let ck = Checkpoint::read(&path)?;
        let text = ck.downstream.as_deref().ok_or_else(|| {
            anyhow!(
                "{}: a pretraining checkpoint, not a fine-tuned one; run `mtx-hpc finetune` \
                 first and give its finetuned.h5",
                path.display()
            )
        })?;
        let record: TaskRecord = serde_json::from_str(text)
            .with_context(|| format!("{}: unreadable 'downstream' attribute", path.display()))?;
        if ck.head != Some(record.head) {
            bail!(
                "{}: the task record's head ({}) and the stored tensors' ({}) disagree",
                path.display(),
                record.head.name(),
                ck.head.map_or("none", |h| h.name())
            );
        }
        let cfg = ck.meta.model.clone();
        let layout = ck.layout();
        let params = ck.read_params(&layout)?;
        let scale = (record.age_mean.unwrap_or(0.0), record.age_sd.unwrap_or(1.0));
        Ok(Finetuned {
            model: Model {
                net: Net::new(&cfg),
                layout,
                task: record.task,
                scale,
                train_encoder: false,
                tumour_weight: 1.0,
            },
            record,
            cfg,
            params,
        })
    }
}

/// One scan to predict.
struct Input {
    id: String,
    session: String,
    image: PathBuf,
    age: Option<f64>,
}

fn inputs(args: &PredictArgs) -> Result<Vec<Input>> {
    if let Some(m) = &args.manifest {
        return Ok(manifest::read_manifest(m)?
            .into_iter()
            .map(|s| Input {
                id: s.id,
                session: s.session.unwrap_or_default(),
                image: s.image,
                age: s.age,
            })
            .collect());
    }
    args.input
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("{}: not a file name", p.display()))?;
            let id = [".nii.gz", ".nii", ".hdr", ".img"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
                .unwrap_or(name);
            Ok(Input {
                id: id.to_string(),
                session: String::new(),
                image: p.clone(),
                age: args.age,
            })
        })
        .collect()
}

pub fn run_predict(args: &PredictArgs) -> Result<()> {
    let ft = Finetuned::open(&args.checkpoint)?;
    let list = inputs(args)?;
    struct Job<'a>(&'a PredictArgs, &'a Finetuned, &'a [Input]);
    impl crate::backend::device::OnBackend for Job<'_> {
        type Out = ();
        fn run<B: Backend>(self, be: &B) -> Result<()> {
            predict(be, self.0, self.1, self.2)
        }
    }
    crate::backend::device::run_on(args.device, 0, false, Job(args, &ft, &list))
}

fn predict<B: Backend>(be: &B, args: &PredictArgs, ft: &Finetuned, list: &[Input]) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create the output folder", args.out.display()))?;
    let rec = &ft.record;
    let params = be.upload(&ft.params);
    let pos = ft.model.positions(be, &ft.cfg);
    let mut rows = vec![match rec.task {
        Task::Diagnosis => "subject_id,session,image,probability,predicted".to_string(),
        Task::Age => "subject_id,session,image,predicted_age,age,gap,gap_corrected".to_string(),
        Task::Segmentation => {
            "subject_id,session,image,mask,voxels_1,voxels_2,voxels_4".to_string()
        }
    }];
    for (i, inp) in list.iter().enumerate() {
        let t0 = Instant::now();
        let prepared = writeback::prepare_for_prediction(&inp.image, &rec.pack)?;
        for w in &prepared.warnings {
            eprintln!("warning: {w}");
        }
        let target = inp.age.unwrap_or(0.0);
        let (_, out) = ft.model.batch(
            be,
            &params,
            None,
            &pos,
            &prepared.volume,
            &[],
            &[target],
            true,
        )?;
        let image = inp.image.display();
        let row = match rec.task {
            Task::Diagnosis => {
                let p = out.scores[0];
                let c = rec
                    .classes
                    .as_ref()
                    .expect("a diagnosis record has classes");
                let t = rec.threshold.unwrap_or(0.5);
                format!(
                    "{},{},{image},{p:.6},{}",
                    inp.id,
                    inp.session,
                    c[usize::from(p >= t)]
                )
            }
            Task::Age => {
                let q = out.scores[0];
                match inp.age {
                    Some(a) => {
                        let corrected = rec.age_bias.map_or(String::new(), |[ba, bb]| {
                            format!("{:.4}", q - (ba + bb * a))
                        });
                        format!(
                            "{},{},{image},{q:.4},{a},{:.4},{corrected}",
                            inp.id,
                            inp.session,
                            q - a
                        )
                    }
                    None => format!("{},{},{image},{q:.4},,,", inp.id, inp.session),
                }
            }
            Task::Segmentation => {
                let (name, codes) = write_mask(
                    &args.out,
                    &inp.id,
                    &inp.session,
                    &out.probs[0],
                    ft.cfg.grid,
                    &prepared.geometry,
                )?;
                let count = |c: u8| codes.iter().filter(|&&x| x == c).count();
                format!(
                    "{},{},{image},{name},{},{},{}",
                    inp.id,
                    inp.session,
                    count(1),
                    count(2),
                    count(4)
                )
            }
        };
        println!(
            "[{}/{}] {} ({:.2} s)",
            i + 1,
            list.len(),
            row,
            t0.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    let mut csv = rows.join("\n");
    csv.push('\n');
    let path = args.out.join(super::finetune::PREDICTIONS);
    crate::io::write_atomic(&path, csv.as_bytes(), true)?;
    println!("{} scan(s): {}", list.len(), path.display());
    Ok(())
}

pub fn run_embed(args: &EmbedArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be positive");
    }
    let ck = Checkpoint::read(&args.checkpoint)?;
    let cfg = ck.meta.model.clone();
    let layout = match &ck.downstream {
        Some(text) => {
            let rec: TaskRecord = serde_json::from_str(text).with_context(|| {
                format!(
                    "{}: unreadable 'downstream' attribute",
                    args.checkpoint.display()
                )
            })?;
            Layout::with_head(&cfg, rec.head)
        }
        None => Layout::new(&cfg),
    };
    let params = ck.read_params(&layout)?;
    let corpus = Corpus::open(&args.corpus)?;
    cfg.check_grid(corpus.grid(), corpus.spacing())
        .with_context(|| format!("{}", corpus.path().display()))?;
    struct Job<'a> {
        args: &'a EmbedArgs,
        cfg: &'a ModelConfig,
        layout: &'a Layout,
        params: &'a [f32],
        corpus: &'a Corpus,
    }
    impl crate::backend::device::OnBackend for Job<'_> {
        type Out = ();
        fn run<B: Backend>(self, be: &B) -> Result<()> {
            embed(
                be,
                self.args,
                self.cfg,
                self.layout,
                self.params,
                self.corpus,
            )
        }
    }
    let job = Job {
        args,
        cfg: &cfg,
        layout: &layout,
        params: &params,
        corpus: &corpus,
    };
    crate::backend::device::run_on(args.device, 0, false, job)
}

fn embed<B: Backend>(
    be: &B,
    args: &EmbedArgs,
    cfg: &ModelConfig,
    layout: &Layout,
    host: &[f32],
    corpus: &Corpus,
) -> Result<()> {
    let t0 = Instant::now();
    let net = Net::new(cfg);
    let d = cfg.d;
    let params = be.upload(host);
    let pos = Plane::ALL.map(|p| {
        let (n, _, _) = p.geometry(cfg.grid);
        be.upload(&crate::model::init::positions(n, d, cfg.pos_base))
    });
    let n_sub = corpus.len();
    let mut planes: [Vec<f32>; 3] = Default::default();
    let mut pooled = Vec::with_capacity(n_sub * 3 * d);
    let (mut raw, mut v) = (Vec::new(), Vec::new());
    let bar = crate::progress::bar(n_sub as u64, "embed");
    let all: Vec<usize> = (0..n_sub).collect();
    for chunk in all.chunks(args.batch) {
        let mut vols = Vec::new();
        for &i in chunk {
            corpus.read_volume(i, &mut raw, &mut v)?;
            vols.extend_from_slice(&v);
        }
        let b = chunk.len();
        let tokens = task::contextualise(be, &net, &params, layout, &pos, &vols, b, false);
        for (p, pl) in tokens.iter().enumerate() {
            let mut h = vec![0.0; b * pl.n * d];
            be.download(be.view(&pl.vectors, 0..h.len()), &mut h);
            planes[p].extend_from_slice(&h);
        }
        let pool = task::pool(be, d, &tokens, b);
        let mut h = vec![0.0; b * 3 * d];
        be.download(be.view(&pool, 0..h.len()), &mut h);
        pooled.extend_from_slice(&h);
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    let out = AtomicFile::new(&args.out, true)?;
    let ctx = || format!("{}: cannot write the embeddings", args.out.display());
    let file = hdf5::File::with_options()
        .with_fapl(|pl| pl.file_locking(false))
        .with_fcpl(|pl| pl.obj_track_times(false))
        .create(out.path())
        .with_context(ctx)?;
    for (plane, data) in Plane::ALL.iter().zip(&planes) {
        let (n, _, _) = plane.geometry(cfg.grid);
        let arr = ndarray::ArrayView3::from_shape((n_sub, n, d), data).with_context(ctx)?;
        file.new_dataset_builder()
            .obj_track_times(false)
            .with_data(arr)
            .create(plane.name())
            .with_context(ctx)?;
    }
    let arr = ndarray::ArrayView2::from_shape((n_sub, 3 * d), &pooled).with_context(ctx)?;
    file.new_dataset_builder()
        .obj_track_times(false)
        .with_data(arr)
        .create("pooled")
        .with_context(ctx)?;
    let g = file.create_group("subjects").with_context(ctx)?;
    for (name, values) in [
        (
            "id",
            corpus
                .subjects()
                .iter()
                .map(|s| s.meta.id.clone())
                .collect::<Vec<_>>(),
        ),
        (
            "session",
            corpus
                .subjects()
                .iter()
                .map(|s| s.meta.session.clone())
                .collect(),
        ),
    ] {
        let v: Vec<hdf5::types::VarLenUnicode> = values
            .iter()
            .map(|s| s.parse().map_err(|e| anyhow!("{s:?}: {e}")))
            .collect::<Result<_>>()?;
        g.new_dataset_builder()
            .obj_track_times(false)
            .with_data(&ndarray::Array1::from(v))
            .create(name)
            .with_context(ctx)?;
    }
    file.close().with_context(ctx)?;
    out.commit()?;
    println!(
        "{n_sub} subjects: {} ({:.1} s)",
        args.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
