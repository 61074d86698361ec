//! The HDF5 checkpoint (format "mtx-hpc-checkpoint", version 1): parameters and Adam moments as
//! one dataset per layout tensor, named by its layout name, plus the state a resumed run needs.
//! Also the run-folder policy: which files a run keeps and which one `--resume auto` picks.
//! docs/checkpoint-format.md is the user-facing description; keep the two in step.
use crate::data::corpus::is_hdf5;
use crate::io::AtomicFile;
use crate::model::{Head, Layout, ModelConfig};
use crate::train::{RunConfig, Stage};
use anyhow::{Context, Result, anyhow, bail};
use hdf5::types::VarLenUnicode;
use hdf5::{File, Group, H5Type, Location};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Value of the root attribute `format`.
pub const FORMAT_NAME: &str = "mtx-hpc-checkpoint";
/// Value of the root attribute `format_version`; readers refuse any other.
pub const FORMAT_VERSION: u32 = 1;
/// Groups holding one f32 dataset per layout tensor.
pub const PARAMS: &str = "params";
pub const ADAM_M: &str = "adam_m";
pub const ADAM_V: &str = "adam_v";
/// The checkpoint with the lowest validation loss so far.
pub const BEST: &str = "best.h5";
/// The state at the end of the run.
pub const FINAL: &str = "final.h5";

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    /// The stage the last step belonged to.
    pub stage: Stage,
    /// Steps completed, counted across stages.
    pub step: u64,
    /// Epochs completed within the stage.
    pub epoch: u64,
    /// Lowest validation loss so far (None before the first validation; stored as NaN).
    pub best_val_loss: Option<f64>,
    /// Epochs of this stage since the validation loss last improved (early stopping resumes
    /// where it was).
    pub stale_epochs: u64,
    pub model: ModelConfig,
    pub run: RunConfig,
    /// BLAKE3 of the corpus file the run trains on, hex.
    pub corpus_checksum: String,
}

/// An opened, validated checkpoint; tensors are read on demand against a layout.
pub struct Checkpoint {
    path: PathBuf,
    pub format_version: u32,
    pub tool_version: String,
    pub meta: CheckpointMeta,
    /// BLAKE3 of the parameters (see [`param_checksum`]), hex.
    pub param_checksum: String,
    /// Whether /adam_m and /adam_v are present.
    pub has_moments: bool,
    /// A fine-tuned model's task head (attribute `head`); None in a pretraining checkpoint.
    pub head: Option<Head>,
    /// A fine-tuned model's task record (JSON, attribute `downstream`), written by
    /// `mtx-hpc finetune`; None in a pretraining checkpoint.
    pub downstream: Option<String>,
    file: File,
}

/// BLAKE3 over every tensor's values as little-endian f32 bytes, in layout order, padding
/// excluded: the same for any alignment, and computable from h5py (docs/checkpoint-format.md).
pub fn param_checksum(layout: &Layout, params: &[f32]) -> Result<String> {
    if params.len() != layout.total() {
        bail!(
            "parameter buffer holds {} values, the {} layout {}",
            params.len(),
            layout.preset(),
            layout.total()
        );
    }
    let mut h = blake3::Hasher::new();
    let mut bytes = Vec::new();
    for e in layout {
        bytes.clear();
        bytes.extend(params[e.range()].iter().flat_map(|v| v.to_le_bytes()));
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

impl Checkpoint {
    /// Writes a checkpoint atomically (temporary name, fsync, rename), replacing `path` if it
    /// exists. `m` and `v` are the Adam moments, both or neither, laid out like `params`.
    pub fn write(
        path: &Path,
        layout: &Layout,
        params: &[f32],
        m: Option<&[f32]>,
        v: Option<&[f32]>,
        meta: &CheckpointMeta,
    ) -> Result<()> {
        Self::write_with(path, layout, params, m, v, meta, None)
    }

    /// [`Checkpoint::write`] with a fine-tuned model's task record (`downstream`, JSON).
    pub fn write_with(
        path: &Path,
        layout: &Layout,
        params: &[f32],
        m: Option<&[f32]>,
        v: Option<&[f32]>,
        meta: &CheckpointMeta,
        downstream: Option<&str>,
    ) -> Result<()> {
        let p = path.display();
        if meta.model.preset != layout.preset() {
            bail!(
                "{p}: model configuration is preset {}, the layout {}",
                meta.model.preset,
                layout.preset()
            );
        }
        if meta.run.preset != meta.model.preset {
            bail!(
                "{p}: run configuration is preset {}, the model configuration {}",
                meta.run.preset,
                meta.model.preset
            );
        }
        let moments = match (m, v) {
            (Some(m), Some(v)) => Some((m, v)),
            (None, None) => None,
            _ => bail!("{p}: Adam moments must be written both or neither"),
        };
        for (what, buf) in [("parameters", Some(params)), ("adam_m", m), ("adam_v", v)] {
            if let Some(b) = buf
                && b.len() != layout.total()
            {
                bail!(
                    "{p}: {what} buffer holds {} values, the layout {}",
                    b.len(),
                    layout.total()
                );
            }
        }
        let checksum = param_checksum(layout, params)?;
        let out = AtomicFile::new(path, true)?;
        let ctx = || format!("{p}: cannot write the checkpoint");
        // A private temporary file: no lock needed, and none leaks into forked children.
        let file = File::with_options()
            .with_fapl(|pl| pl.file_locking(false))
            .with_fcpl(|pl| pl.obj_track_times(false))
            .create(out.path())
            .with_context(ctx)?;
        write_root_attrs(&file, meta, &checksum).with_context(ctx)?;
        if let Some(h) = layout.head() {
            write_str_attr(&file, "head", h.name()).with_context(ctx)?;
        }
        if let Some(d) = downstream {
            write_str_attr(&file, "downstream", d).with_context(ctx)?;
        }
        write_tensors(&file, PARAMS, layout, params).with_context(ctx)?;
        if let Some((m, v)) = moments {
            write_tensors(&file, ADAM_M, layout, m).with_context(ctx)?;
            write_tensors(&file, ADAM_V, layout, v).with_context(ctx)?;
        }
        file.close().with_context(ctx)?;
        out.commit()
    }

    /// Opens `path` and checks that it is a complete checkpoint of the version this tool reads,
    /// with readable configurations. Tensors are checked and read by [`Checkpoint::read_params`].
    pub fn read(path: &Path) -> Result<Self> {
        let p = path.display();
        if !path.exists() {
            bail!("{p}: no such file");
        }
        if !is_hdf5(path)? {
            bail!("{p}: not an HDF5 file, so not an mtx-hpc checkpoint");
        }
        let file = open_unlocked(path)
            .with_context(|| format!("{p}: cannot open as HDF5 (truncated or damaged?)"))?;
        let format = read_str_attr(&file, "format")
            .map_err(|_| anyhow!("{p}: not an mtx-hpc checkpoint (no 'format' attribute)"))?;
        if format != FORMAT_NAME {
            bail!(
                "{p}: not an mtx-hpc checkpoint (format is '{format}', expected '{FORMAT_NAME}')"
            );
        }
        let version: i64 = file
            .attr("format_version")
            .and_then(|a| a.read_scalar())
            .map_err(|_| anyhow!("{p}: checkpoint has no readable 'format_version' attribute"))?;
        if version != i64::from(FORMAT_VERSION) {
            bail!(
                "{p}: checkpoint format version {version}, but this mtx-hpc ({}) reads version \
{FORMAT_VERSION} only; use the mtx-hpc that wrote it",
                crate::TOOL_VERSION
            );
        }
        let meta = read_meta(&file).with_context(|| format!("{p}: bad checkpoint attributes"))?;
        let has_m = file.link_exists(ADAM_M);
        if has_m != file.link_exists(ADAM_V) {
            bail!("{p}: checkpoint has only one of /{ADAM_M} and /{ADAM_V}");
        }
        if !file.link_exists(PARAMS) {
            bail!("{p}: checkpoint has no /{PARAMS} group");
        }
        let head = match read_str_attr(&file, "head") {
            Ok(name) => Some(Head::from_name(&name).ok_or_else(|| {
                anyhow!("{p}: attribute 'head' is '{name}', not classify, regress or segment")
            })?),
            Err(_) => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            head,
            format_version: FORMAT_VERSION,
            tool_version: read_str_attr(&file, "tool_version").with_context(|| p.to_string())?,
            param_checksum: read_str_attr(&file, "param_checksum")
                .with_context(|| p.to_string())?,
            meta,
            has_moments: has_m,
            downstream: read_str_attr(&file, "downstream").ok(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout the file was written with: the stored model's, with its task head if any.
    pub fn layout(&self) -> Layout {
        match self.head {
            Some(h) => Layout::with_head(&self.meta.model, h),
            None => Layout::new(&self.meta.model),
        }
    }

    /// The tensors stored in /params as (name, shape), in the file's (alphabetical) order.
    pub fn tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let g = self.group(PARAMS)?;
        let mut out = Vec::new();
        for name in g.member_names()? {
            let ds = g
                .dataset(&name)
                .with_context(|| format!("{}: /{PARAMS}/{name}", self.path.display()))?;
            out.push((name, ds.shape()));
        }
        Ok(out)
    }

    /// Checks that the checkpoint fits `layout`: the same preset, every tensor present with
    /// its shape and stored as float32, and no tensor the layout does not know.
    pub fn check_layout(&self, layout: &Layout) -> Result<()> {
        let p = self.path.display();
        let ours = self.meta.model.preset;
        if ours != layout.preset() {
            bail!(
                "{p}: checkpoint of preset {ours}, but this run uses preset {}; pass --preset \
{ours} or a checkpoint of preset {}",
                layout.preset(),
                layout.preset()
            );
        }
        let groups: &[&str] = if self.has_moments {
            &[PARAMS, ADAM_M, ADAM_V]
        } else {
            &[PARAMS]
        };
        for &gname in groups {
            let g = self.group(gname)?;
            for e in layout {
                let ds = g.dataset(&e.name).map_err(|_| {
                    anyhow!(
                        "{p}: tensor '{}' is missing from /{gname}: the checkpoint does not fit \
the {} layout of this version",
                        e.name,
                        layout.preset()
                    )
                })?;
                if ds.shape() != e.shape {
                    bail!(
                        "{p}: tensor /{gname}/{} has shape {:?}, the layout expects {:?}",
                        e.name,
                        ds.shape(),
                        e.shape
                    );
                }
                let dtype = ds.dtype()?.to_descriptor()?;
                if dtype != f32::type_descriptor() {
                    bail!("{p}: tensor /{gname}/{} is {dtype:?}, not float32", e.name);
                }
            }
            for name in g.member_names()? {
                if layout.get(&name).is_none() {
                    bail!(
                        "{p}: tensor /{gname}/{name} is not in the {} layout of this version",
                        layout.preset()
                    );
                }
            }
        }
        Ok(())
    }

    /// The parameters flattened into `layout`'s buffer, after [`Checkpoint::check_layout`]
    /// and a check of `param_checksum`.
    pub fn read_params(&self, layout: &Layout) -> Result<Vec<f32>> {
        let mut buf = vec![0.0; layout.total()];
        self.read_params_into(layout, &mut buf)?;
        Ok(buf)
    }

    /// Like [`Checkpoint::read_params`], into a buffer of `layout.total()` values (padding is
    /// left as it is).
    pub fn read_params_into(&self, layout: &Layout, buf: &mut [f32]) -> Result<()> {
        self.check_layout(layout)?;
        self.read_group(PARAMS, layout, buf)?;
        let got = param_checksum(layout, buf)?;
        if got != self.param_checksum {
            bail!(
                "{}: parameters do not match the stored param_checksum: the file is damaged",
                self.path.display()
            );
        }
        Ok(())
    }

    /// The Adam moments (m, v) flattened into `layout`'s buffers, or None when the checkpoint
    /// holds parameters only.
    pub fn read_moments(&self, layout: &Layout) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !self.has_moments {
            return Ok(None);
        }
        self.check_layout(layout)?;
        let mut m = vec![0.0; layout.total()];
        let mut v = vec![0.0; layout.total()];
        self.read_group(ADAM_M, layout, &mut m)?;
        self.read_group(ADAM_V, layout, &mut v)?;
        Ok(Some((m, v)))
    }

    fn group(&self, name: &str) -> Result<Group> {
        self.file
            .group(name)
            .map_err(|_| anyhow!("{}: group /{name} is missing", self.path.display()))
    }

    fn read_group(&self, gname: &str, layout: &Layout, buf: &mut [f32]) -> Result<()> {
        if buf.len() != layout.total() {
            bail!(
                "buffer holds {} values, the layout {}",
                buf.len(),
                layout.total()
            );
        }
        let g = self.group(gname)?;
        for e in layout {
            let values: Vec<f32> = g
                .dataset(&e.name)
                .and_then(|ds| ds.read_raw())
                .with_context(|| {
                    format!("{}: cannot read /{gname}/{}", self.path.display(), e.name)
                })?;
            if values.len() != e.len {
                bail!(
                    "{}: /{gname}/{} holds {} values, expected {}",
                    self.path.display(),
                    e.name,
                    values.len(),
                    e.len
                );
            }
            buf[e.range()].copy_from_slice(&values);
        }
        Ok(())
    }
}

/// Whether `path` is an HDF5 file whose root `format` attribute names a checkpoint.
pub fn is_checkpoint(path: &Path) -> bool {
    matches!(is_hdf5(path), Ok(true))
        && open_unlocked(path)
            .ok()
            .and_then(|f| read_str_attr(&f, "format").ok())
            .is_some_and(|f| f == FORMAT_NAME)
}

/// Opens without HDF5 file locks: they fail or hang on parallel filesystems, and HDF5's lock
/// leaks into any child forked while the file is open.
fn open_unlocked(path: &Path) -> hdf5::Result<File> {
    File::with_options()
        .with_fapl(|p| p.file_locking(false))
        .open(path)
}

fn write_str_attr(loc: &Location, name: &str, value: &str) -> Result<()> {
    let v = VarLenUnicode::from_str(value)
        .map_err(|e| anyhow!("attribute {name}: text cannot be stored: {e}"))?;
    loc.new_attr::<VarLenUnicode>()
        .create(name)
        .and_then(|a| a.write_scalar(&v))
        .with_context(|| format!("attribute {name}"))
}

fn write_scalar_attr<T: H5Type>(loc: &Location, name: &str, value: T) -> Result<()> {
    loc.new_attr::<T>()
        .create(name)
        .and_then(|a| a.write_scalar(&value))
        .with_context(|| format!("attribute {name}"))
}

fn read_str_attr(loc: &Location, name: &str) -> Result<String> {
    if !loc.attr_names()?.iter().any(|n| n == name) {
        bail!("attribute '{name}' is missing");
    }
    let v: VarLenUnicode = loc
        .attr(name)
        .and_then(|a| a.read_scalar())
        .map_err(|e| anyhow!("attribute '{name}' is not a string: {e}"))?;
    Ok(v.as_str().to_string())
}

fn read_scalar_attr<T: H5Type>(loc: &Location, name: &str) -> Result<T> {
    loc.attr(name)
        .and_then(|a| a.read_scalar())
        .map_err(|_| anyhow!("attribute '{name}' is missing or not a number"))
}

fn write_root_attrs(file: &File, meta: &CheckpointMeta, checksum: &str) -> Result<()> {
    write_str_attr(file, "format", FORMAT_NAME)?;
    write_scalar_attr(file, "format_version", FORMAT_VERSION)?;
    write_str_attr(file, "tool_version", crate::TOOL_VERSION)?;
    write_str_attr(file, "stage", meta.stage.name())?;
    write_scalar_attr(file, "step", meta.step)?;
    write_scalar_attr(file, "epoch", meta.epoch)?;
    write_scalar_attr(
        file,
        "best_val_loss",
        meta.best_val_loss.unwrap_or(f64::NAN),
    )?;
    write_scalar_attr(file, "stale_epochs", meta.stale_epochs)?;
    write_str_attr(file, "preset", meta.model.preset.name())?;
    let model = toml::to_string(&meta.model).context("model configuration as TOML")?;
    write_str_attr(file, "model_config", &model)?;
    write_str_attr(file, "run_config", &meta.run.to_toml()?)?;
    write_str_attr(file, "corpus_checksum", &meta.corpus_checksum)?;
    write_str_attr(file, "param_checksum", checksum)?;
    Ok(())
}

fn write_tensors(file: &File, group: &str, layout: &Layout, buf: &[f32]) -> Result<()> {
    let g = file
        .create_group_builder()
        .with_create_plist(|p| p.obj_track_times(false))
        .create(group)
        .with_context(|| format!("group /{group}"))?;
    for e in layout {
        let ds = g
            .new_dataset::<f32>()
            .shape(e.shape.as_slice())
            .obj_track_times(false)
            .create(e.name.as_str())
            .with_context(|| format!("/{group}/{}", e.name))?;
        ds.write_raw(&buf[e.range()])
            .with_context(|| format!("/{group}/{}", e.name))?;
        if group == PARAMS {
            // Where the tensor sits in the flat buffer, so that readers outside mtx-hpc can
            // rebuild it (and the checksum) without the layout code.
            write_scalar_attr(&ds, "offset", e.offset as u64)?;
        }
    }
    Ok(())
}

fn read_meta(file: &File) -> Result<CheckpointMeta> {
    let stage_name = read_str_attr(file, "stage")?;
    let stage = Stage::from_name(&stage_name)
        .ok_or_else(|| anyhow!("attribute 'stage' is '{stage_name}', not triplet or mevp"))?;
    let model: ModelConfig = toml::from_str(&read_str_attr(file, "model_config")?)
        .map_err(|e| anyhow!("attribute 'model_config' is not a model configuration: {e}"))?;
    model
        .validate()
        .context("attribute 'model_config' holds an impossible model")?;
    let run = RunConfig::from_toml(&read_str_attr(file, "run_config")?)
        .context("attribute 'run_config' is not a run configuration")?;
    let preset = read_str_attr(file, "preset")?;
    if preset != model.preset.name() {
        bail!(
            "attribute 'preset' is '{preset}' but the model configuration says '{}'",
            model.preset
        );
    }
    if run.preset != model.preset {
        bail!(
            "the run configuration says preset '{}' but the model configuration '{}'",
            run.preset,
            model.preset
        );
    }
    let best: f64 = read_scalar_attr(file, "best_val_loss")?;
    Ok(CheckpointMeta {
        stage,
        step: read_scalar_attr(file, "step")?,
        epoch: read_scalar_attr(file, "epoch")?,
        best_val_loss: (!best.is_nan()).then_some(best),
        stale_epochs: read_scalar_attr(file, "stale_epochs")?,
        model,
        run,
        corpus_checksum: read_str_attr(file, "corpus_checksum")?,
    })
}

/// File name of the checkpoint after `step` (8 digits, so names sort like steps).
pub fn step_file_name(step: u64) -> String {
    format!("ckpt-step{step:08}.h5")
}

/// The step of a file named by [`step_file_name`]; None for any other name (temporary
/// `.partial` files, best.h5, final.h5, other files).
pub fn parse_step_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-step")?.strip_suffix(".h5")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The step checkpoints in `run_dir`, oldest first (none when the folder does not exist yet).
/// Only renamed-into-place files carry these names, so every one is complete.
pub fn step_files(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !run_dir.exists() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(run_dir)
        .with_context(|| format!("{}: cannot list the run folder", run_dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", run_dir.display()))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_step_file_name)
            && entry.path().is_file()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `run_dir` by step: the step files, and final.h5 and
/// best.h5 by their `step` attribute (on a tie the step file, then final.h5, wins; they hold
/// the same state). None when the folder holds no checkpoint.
pub fn latest_complete(run_dir: &Path) -> Result<Option<PathBuf>> {
    // Rank by (step, preference) so a tie goes to the more specific file.
    let mut best: Option<(u64, u8, PathBuf)> = step_files(run_dir)?
        .pop()
        .map(|(step, path)| (step, 2, path));
    for (name, rank) in [(FINAL, 1), (BEST, 0)] {
        let path = run_dir.join(name);
        if !path.is_file() {
            continue;
        }
        let step = Checkpoint::read(&path)?.meta.step;
        if best.as_ref().is_none_or(|b| (step, rank) > (b.0, b.1)) {
            best = Some((step, rank, path));
        }
    }
    Ok(best.map(|b| b.2))
}

/// Deletes all but the newest `keep_last` step checkpoints; best.h5, final.h5, temporary
/// files and anything else are never touched. Returns the deleted files.
pub fn prune(run_dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    let files = step_files(run_dir)?;
    let cut = files.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for (_, path) in files.into_iter().take(cut) {
        std::fs::remove_file(&path)
            .with_context(|| format!("{}: cannot delete an old checkpoint", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}
