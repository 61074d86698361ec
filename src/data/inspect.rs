//! `inspect`: what a file holds. A corpus gets a summary (format, grid, subjects, split sizes,
//! label statistics, provenance), one subject's metadata with `--subject`, and a mid-plane
//! montage with `--png`; a NIfTI file is described by the NIfTI reader; a checkpoint (told
//! from a corpus by its root `format` attribute) by its state, tensors and configurations.
use crate::cli::InspectArgs;
use crate::data::corpus::{Corpus, SubjectInfo, affine_source_name, is_hdf5};
use crate::data::montage;
use crate::model::Part;
use crate::train::Checkpoint;
use crate::train::checkpoint::is_checkpoint;
use anyhow::{Result, bail};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// What kind of file `inspect` was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Corpus,
    Checkpoint,
    Nifti,
}

/// By content first (the HDF5 signature), then by extension.
pub fn detect(path: &Path) -> Result<FileKind> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    if path.is_dir() {
        bail!("{}: is a folder, not a file", path.display());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if is_hdf5(path)? && is_checkpoint(path) {
        return Ok(FileKind::Checkpoint);
    }
    if is_hdf5(path)? || name.ends_with(".h5") || name.ends_with(".hdf5") {
        return Ok(FileKind::Corpus);
    }
    if name.ends_with(".nii") || name.ends_with(".nii.gz") || name.ends_with(".hdr") {
        return Ok(FileKind::Nifti);
    }
    bail!(
        "{}: neither a corpus or checkpoint (HDF5) nor a NIfTI file (.nii, .nii.gz): nothing to inspect",
        path.display()
    )
}

/// Entry point of `mtx-hpc inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    match detect(&args.path)? {
        FileKind::Nifti => {
            if args.subject.is_some() || args.png.is_some() {
                bail!(
                    "{}: --subject and --png apply to corpora, not NIfTI files",
                    args.path.display()
                );
            }
            print!("{}", describe_nifti(&args.path)?);
        }
        FileKind::Checkpoint => {
            if args.subject.is_some() || args.png.is_some() {
                bail!(
                    "{}: --subject and --png apply to corpora, not checkpoints",
                    args.path.display()
                );
            }
            print!("{}", describe_checkpoint(&Checkpoint::read(&args.path)?)?);
        }
        FileKind::Corpus => {
            let corpus = Corpus::open(&args.path)?;
            match &args.subject {
                None => print!("{}", describe_corpus(&corpus)?),
                Some(key) => {
                    let i = find_subject(&corpus, key)?;
                    print!("{}", describe_subject(&corpus, i));
                    if let Some(png) = &args.png {
                        let (w, h) = write_png(&corpus, i, png)?;
                        println!(
                            "png: {} ({w}x{h}): axial | sagittal | coronal mid-planes, {}x nearest; {}",
                            png.display(),
                            montage::SCALE,
                            montage::CONVENTION
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn describe_nifti(path: &Path) -> Result<String> {
    crate::data::nifti::read::describe(path)
}

/// The spelling the command line uses for an option value (`centre`, `minmax`), so the
/// summary can be pasted back into a `pack` command.
fn cli_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(|| "?".to_string(), |p| p.get_name().to_string())
}

/// Subject by "ID", or "ID:SESSION" when the subject has several sessions.
pub fn find_subject(corpus: &Corpus, key: &str) -> Result<usize> {
    let all = corpus.indices_of(key);
    if all.len() == 1 {
        return Ok(all[0]);
    }
    if all.len() > 1 {
        let keys: Vec<String> = all
            .iter()
            .map(|&i| format!("{key}:{}", corpus.subjects()[i].meta.session))
            .collect();
        bail!(
            "{}: subject {key} has {} sessions; pick one of {}",
            corpus.path().display(),
            all.len(),
            keys.join(", ")
        );
    }
    if let Some((id, ses)) = key.rsplit_once(':')
        && let Some(i) = corpus.find(id, Some(ses))
    {
        return Ok(i);
    }
    let mut ids: Vec<&str> = corpus
        .subjects()
        .iter()
        .map(|s| s.meta.id.as_str())
        .collect();
    ids.dedup();
    let shown: Vec<&str> = ids.iter().take(5).copied().collect();
    let more = if ids.len() > shown.len() { ", ..." } else { "" };
    bail!(
        "{}: no subject '{key}'; the corpus has {} subject(s), e.g. {}{more}",
        corpus.path().display(),
        ids.len(),
        shown.join(", ")
    )
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

fn counts<'a>(subjects: &'a [SubjectInfo], field: impl Fn(&'a SubjectInfo) -> &'a str) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for s in subjects {
        *m.entry(or_unknown(field(s))).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The corpus summary `inspect CORPUS` prints.
pub fn describe_corpus(c: &Corpus) -> Result<String> {
    let info = c.info();
    let s = c.subjects();
    let g = c.grid();
    let mut t = String::new();
    let distinct = {
        let mut ids: Vec<&str> = s.iter().map(|x| x.meta.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    writeln!(t, "file:          {}", c.path().display())?;
    writeln!(
        t,
        "format:        {} version {}",
        crate::data::corpus::FORMAT_NAME,
        info.format_version
    )?;
    writeln!(
        t,
        "grid:          {} x {} x {} voxels (RAS), spacing {} mm",
        g[0],
        g[1],
        g[2],
        c.spacing()
    )?;
    writeln!(
        t,
        "volumes:       {} ({} subjects), float16",
        c.len(),
        distinct
    )?;
    writeln!(
        t,
        "split:         train {}, val {} (val_fraction {}, seed {})",
        c.train_indices().len(),
        c.val_indices().len(),
        info.val_fraction,
        info.split_seed
    )?;
    writeln!(t, "diagnosis:     {}", counts(s, |x| &x.meta.diagnosis))?;
    writeln!(t, "sex:           {}", counts(s, |x| &x.meta.sex))?;
    writeln!(t, "site:          {}", counts(s, |x| &x.meta.site))?;
    let ages: Vec<f32> = s.iter().filter_map(|x| x.meta.age).collect();
    if ages.is_empty() {
        writeln!(t, "age:           unknown for all")?;
    } else {
        let min = ages.iter().copied().fold(f32::INFINITY, f32::min);
        let max = ages.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mean = ages.iter().map(|&a| f64::from(a)).sum::<f64>() / ages.len() as f64;
        writeln!(
            t,
            "age:           min {min:.1}, mean {mean:.1}, max {max:.1} ({} known, {} unknown)",
            ages.len(),
            s.len() - ages.len()
        )?;
    }
    let mut label_voxels: BTreeMap<u8, u64> = BTreeMap::new();
    let mut buf = Vec::new();
    let mut with_seg = 0;
    for i in 0..c.len() {
        if c.read_labels(i, &mut buf)? {
            with_seg += 1;
            for &l in buf.iter().filter(|&&l| l != 0) {
                *label_voxels.entry(l).or_default() += 1;
            }
        }
    }
    let voxels: Vec<String> = label_voxels
        .iter()
        .map(|(l, n)| format!("label {l}: {n}"))
        .collect();
    writeln!(
        t,
        "segmentation:  {with_seg} volume(s){}",
        if voxels.is_empty() {
            String::new()
        } else {
            format!("; voxels {}", voxels.join(", "))
        }
    )?;
    writeln!(
        t,
        "affine source: {}",
        counts(s, |x| affine_source_name(x.geometry.affine_source))
    )?;
    let p = &info.params;
    writeln!(
        t,
        "preprocessing: spacing {} mm, grid {}, align {}, normalise {}, volume {}",
        p.spacing,
        p.grid.map(|g| g.to_string()).join(","),
        cli_name(p.align),
        cli_name(p.normalise),
        p.volume.map_or("-".to_string(), |v| v.to_string())
    )?;
    writeln!(t, "tool version:  {}", info.tool_version)?;
    writeln!(t, "command:       {}", info.creation_command)?;
    Ok(t)
}

/// One subject's metadata and geometry.
pub fn describe_subject(c: &Corpus, i: usize) -> String {
    let s = &c.subjects()[i];
    let m = &s.meta;
    let mut t = String::new();
    let mat = |m: &crate::data::geometry::Mat4| {
        m.iter()
            .map(|r| format!("[{:9.3} {:9.3} {:9.3} {:9.3}]", r[0], r[1], r[2], r[3]))
            .collect::<Vec<_>>()
            .join("\n                ")
    };
    let _ = writeln!(
        t,
        "subject:        {} (index {i}, {} split)",
        m.id,
        s.split.name()
    );
    let _ = writeln!(t, "session:        {}", or_unknown(&m.session));
    let _ = writeln!(
        t,
        "age:            {}",
        m.age.map_or("unknown".to_string(), |a| format!("{a:.1}"))
    );
    let _ = writeln!(t, "sex:            {}", or_unknown(&m.sex));
    let _ = writeln!(t, "diagnosis:      {}", or_unknown(&m.diagnosis));
    let _ = writeln!(t, "site:           {}", or_unknown(&m.site));
    let _ = writeln!(
        t,
        "segmentation:   {}",
        if s.has_segmentation { "yes" } else { "no" }
    );
    let _ = writeln!(t, "source file:    {}", m.source_file);
    let _ = writeln!(t, "source blake3:  {}", m.source_checksum);
    let g = &s.geometry;
    let _ = writeln!(t, "source shape:   {:?}", g.source_shape);
    let _ = writeln!(
        t,
        "source affine:  {} ({})",
        mat(&g.source_affine),
        affine_source_name(g.affine_source)
    );
    let _ = writeln!(t, "grid affine:    {}", mat(&g.grid_affine));
    let _ = writeln!(t, "grid -> source: {}", mat(&g.grid_to_source));
    t
}

/// Renders subject `i`'s mid-planes to `out`; returns the image size.
pub fn write_png(c: &Corpus, i: usize, out: &Path) -> Result<(usize, usize)> {
    let (mut raw, mut vol, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    c.read_volume(i, &mut raw, &mut vol)?;
    let has = c.read_labels(i, &mut labels)?;
    let img = montage::mid_planes(&vol, has.then_some(labels.as_slice()), c.grid())?;
    let bytes = montage::encode_png(&img)?;
    crate::io::write_atomic(out, &bytes, true)?;
    Ok((img.width, img.height))
}

/// The checkpoint summary `inspect CKPT` prints: state, parameter counts, every tensor with its
/// L2 norm (in layout order, read through the stored model's layout, checksum verified), and
/// the two configurations.
pub fn describe_checkpoint(c: &Checkpoint) -> Result<String> {
    let m = &c.meta;
    let layout = c.layout();
    let params = c.read_params(&layout)?;
    let mut t = String::new();
    writeln!(t, "file:            {}", c.path().display())?;
    writeln!(
        t,
        "format:          {} version {}",
        crate::train::checkpoint::FORMAT_NAME,
        c.format_version
    )?;
    writeln!(t, "tool version:    {}", c.tool_version)?;
    writeln!(
        t,
        "state:           stage {}, step {}, epoch {}",
        m.stage, m.step, m.epoch
    )?;
    writeln!(
        t,
        "best val loss:   {}",
        m.best_val_loss
            .map_or("none yet".to_string(), |v| v.to_string())
    )?;
    writeln!(t, "preset:          {}", m.model.preset)?;
    writeln!(
        t,
        "parameters:      encoder {}, transformer {}{}, total {} ({} tensors)",
        layout.param_count(Part::Encoder),
        layout.param_count(Part::Transformer),
        c.head.map_or(String::new(), |h| format!(
            ", {} head {}",
            h.name(),
            layout.param_count(Part::Head)
        )),
        layout.param_total(),
        layout.entries().len()
    )?;
    writeln!(
        t,
        "adam moments:    {}",
        if c.has_moments { "yes" } else { "no" }
    )?;
    writeln!(t, "corpus blake3:   {}", m.corpus_checksum)?;
    if let Some(d) = &c.downstream {
        writeln!(t, "fine-tuned for:  {d}")?;
    }
    writeln!(t, "params blake3:   {} (verified)", c.param_checksum)?;
    writeln!(t, "tensors (layout order: name, shape, L2 norm):")?;
    let width = layout.iter().map(|e| e.name.len()).max().unwrap_or(0);
    for e in &layout {
        let norm = params[e.range()]
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let shape = format!("{:?}", e.shape);
        // Fixed notation for ordinary magnitudes, exponents for the extremes a diverged run
        // produces.
        let norm = if norm == 0.0 || (1e-3..1e6).contains(&norm) {
            format!("{norm:.6}")
        } else {
            format!("{norm:.6e}")
        };
        writeln!(t, "  {:width$}  {shape:16}  {norm}", e.name)?;
    }
    let model = toml::to_string(&m.model)?;
    writeln!(t, "model configuration:")?;
    for line in model.lines() {
        writeln!(t, "  {line}")?;
    }
    writeln!(t, "run configuration:")?;
    for line in m.run.to_toml()?.lines() {
        writeln!(t, "  {line}")?;
    }
    Ok(t)
}
