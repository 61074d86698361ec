//! Streaming corpus writer: datasets sized for every subject up front, each subject written as
//! soon as it is ready (one chunk), metadata and the split at the end, all into a temporary
//! file that is renamed into place only by `finish`. Dropped early, it leaves nothing.
use super::{
    CorpusHeader, FORMAT_NAME, FORMAT_VERSION, SPLIT_CODES, SubjectMeta, affine_source_name,
    mat_to_flat, split_subjects,
};
use crate::data::preprocess::{PackGeometry, Prepared};
use crate::io::AtomicFile;
use anyhow::{Context, Result, bail};
use half::f16;
use half::slice::HalfFloatSliceExt;
use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File, Group, H5Type, Location};
use ndarray::{Array1, Array2, Array3, ArrayView4, s};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Writes one corpus. `push` subjects in order, then `finish`.
pub struct CorpusWriter {
    // Field order is drop order: HDF5 handles close before the temporary file is removed.
    volumes: Dataset,
    labels: Option<Dataset>,
    file: File,
    out: AtomicFile,
    target: PathBuf,
    header: CorpusHeader,
    capacity: usize,
    records: Vec<(SubjectMeta, PackGeometry, bool)>,
    half_buf: Vec<f16>,
}

impl CorpusWriter {
    /// Starts a corpus with room for `capacity` subjects (fewer may be written: the datasets
    /// are shrunk by `finish`). `out` decides where it lands and whether it may overwrite.
    pub fn create(
        out: AtomicFile,
        target: &Path,
        header: CorpusHeader,
        capacity: usize,
    ) -> Result<Self> {
        let grid = header.params.grid;
        if capacity == 0 {
            bail!("{}: no subjects to write", target.display());
        }
        if grid.contains(&0) {
            bail!("{}: grid {grid:?} has an empty axis", target.display());
        }
        let tmp = out.path().to_path_buf();
        let ctx = || {
            format!(
                "{}: cannot create the corpus (temporary file {})",
                target.display(),
                tmp.display()
            )
        };
        // A private temporary file: no lock needed (see Corpus::open for why locks hurt).
        let file = File::with_options()
            .with_fapl(|p| p.file_locking(false))
            .with_fcpl(|p| p.obj_track_times(false))
            .create(&tmp)
            .with_context(ctx)?;
        let volumes =
            create_volume_dataset::<f16>(&file, "volumes", capacity, grid).with_context(ctx)?;
        Ok(Self {
            volumes,
            labels: None,
            file,
            out,
            target: target.to_path_buf(),
            header,
            capacity,
            records: Vec::with_capacity(capacity),
            half_buf: Vec::new(),
        })
    }

    /// Subjects written so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Writes the next subject. Its volume must be on the corpus grid.
    pub fn push(&mut self, meta: SubjectMeta, prepared: &Prepared) -> Result<()> {
        let i = self.records.len();
        let grid = self.header.params.grid;
        let n_vox = grid.iter().product::<usize>();
        let who = format!("{}: subject {}", self.target.display(), meta.id);
        if i >= self.capacity {
            bail!("{who}: more subjects than the {} announced", self.capacity);
        }
        if prepared.volume.len() != n_vox {
            bail!(
                "{who}: volume has {} voxels, the grid {grid:?} needs {n_vox}",
                prepared.volume.len()
            );
        }
        self.half_buf.resize(n_vox, f16::ZERO);
        self.half_buf.convert_from_f32_slice(&prepared.volume);
        let view = ArrayView4::from_shape((1, grid[0], grid[1], grid[2]), &self.half_buf)?;
        self.volumes
            .write_slice(view, s![i..i + 1, .., .., ..])
            .with_context(|| format!("{who}: cannot write the volume"))?;
        if let Some(labels) = &prepared.labels {
            if labels.len() != n_vox {
                bail!(
                    "{who}: segmentation has {} voxels, the grid needs {n_vox}",
                    labels.len()
                );
            }
            // Created at the first segmentation: a corpus without any has no /labels, and the
            // chunks of earlier subjects stay unallocated and read as the fill value 0.
            if self.labels.is_none() {
                let ds = create_volume_dataset::<u8>(&self.file, "labels", self.capacity, grid)
                    .with_context(|| format!("{who}: cannot create /labels"))?;
                self.labels = Some(ds);
            }
            if let Some(ds) = &self.labels {
                let view = ArrayView4::from_shape((1, grid[0], grid[1], grid[2]), labels)?;
                ds.write_slice(view, s![i..i + 1, .., .., ..])
                    .with_context(|| format!("{who}: cannot write the segmentation"))?;
            }
        }
        self.records
            .push((meta, prepared.geometry.clone(), prepared.labels.is_some()));
        Ok(())
    }

    /// Writes the metadata, the split and the root attributes, closes the file and renames it
    /// into place. Returns the final path.
    pub fn finish(self) -> Result<PathBuf> {
        let Self {
            volumes,
            labels,
            file,
            out,
            target,
            header,
            records,
            ..
        } = self;
        let n = records.len();
        let ctx = || format!("{}: cannot finish the corpus", target.display());
        if n == 0 {
            bail!("{}: no subject was written", target.display());
        }
        let g = header.params.grid;
        volumes.resize((n, g[0], g[1], g[2])).with_context(ctx)?;
        if let Some(ds) = &labels {
            ds.resize((n, g[0], g[1], g[2])).with_context(ctx)?;
        }
        write_volume_attrs(&volumes).with_context(ctx)?;
        write_subjects(&file, &records, &header).with_context(ctx)?;
        write_root_attrs(&file, &header).with_context(ctx)?;
        drop(volumes);
        drop(labels);
        file.close().with_context(ctx)?;
        out.commit()?;
        Ok(target)
    }
}

fn create_volume_dataset<T: H5Type>(
    file: &File,
    name: &str,
    n: usize,
    grid: [usize; 3],
) -> hdf5::Result<Dataset> {
    // Fixed maximum shape: shrinking on `finish` only needs the chunked layout.
    file.new_dataset::<T>()
        .shape([n, grid[0], grid[1], grid[2]])
        .chunk([1, grid[0], grid[1], grid[2]])
        .obj_track_times(false)
        .create(name)
}

fn vlen(s: &str) -> Result<VarLenUnicode> {
    VarLenUnicode::from_str(s).map_err(|e| anyhow::anyhow!("string {s:?} cannot be stored: {e}"))
}

fn str_dataset(group: &Group, name: &str, values: impl Iterator<Item = String>) -> Result<()> {
    let v: Vec<VarLenUnicode> = values.map(|s| vlen(&s)).collect::<Result<_>>()?;
    group
        .new_dataset_builder()
        .obj_track_times(false)
        .with_data(&Array1::from(v))
        .create(name)
        .with_context(|| format!("/subjects/{name}"))?;
    Ok(())
}

fn num_dataset<'a, T: H5Type + 'a, D: ndarray::Dimension + 'a>(
    group: &Group,
    name: &str,
    data: impl Into<ndarray::ArrayView<'a, T, D>>,
) -> Result<Dataset> {
    group
        .new_dataset_builder()
        .obj_track_times(false)
        .with_data(data)
        .create(name)
        .with_context(|| format!("/subjects/{name}"))
}

fn write_subjects(
    file: &File,
    records: &[(SubjectMeta, PackGeometry, bool)],
    header: &CorpusHeader,
) -> Result<()> {
    let n = records.len();
    let group = file
        .create_group_builder()
        .with_create_plist(|p| p.obj_track_times(false))
        .create("subjects")?;
    let meta = || records.iter().map(|r| &r.0);
    str_dataset(&group, "id", meta().map(|m| m.id.clone()))?;
    str_dataset(&group, "session", meta().map(|m| m.session.clone()))?;
    str_dataset(&group, "source_file", meta().map(|m| m.source_file.clone()))?;
    str_dataset(
        &group,
        "source_checksum",
        meta().map(|m| m.source_checksum.clone()),
    )?;
    str_dataset(&group, "sex", meta().map(|m| m.sex.clone()))?;
    str_dataset(&group, "diagnosis", meta().map(|m| m.diagnosis.clone()))?;
    str_dataset(&group, "site", meta().map(|m| m.site.clone()))?;
    let age: Array1<f32> = meta().map(|m| m.age.unwrap_or(f32::NAN)).collect();
    num_dataset(&group, "age", &age)?;
    let has_seg: Array1<u8> = records.iter().map(|r| u8::from(r.2)).collect();
    num_dataset(&group, "has_segmentation", &has_seg)?;
    let ids: Vec<&str> = meta().map(|m| m.id.as_str()).collect();
    let split: Array1<u8> = split_subjects(&ids, header.val_fraction, header.split_seed)
        .into_iter()
        .map(|s| s.code())
        .collect();
    let ds = num_dataset(&group, "split", &split)?;
    write_str_attr(&ds, "codes", SPLIT_CODES)?;

    let mut shape = Array2::<i64>::zeros((n, 3));
    let mut source_affine = Array3::<f64>::zeros((n, 4, 4));
    let mut grid_affine = Array3::<f64>::zeros((n, 4, 4));
    let mut grid_to_source = Array3::<f64>::zeros((n, 4, 4));
    for (i, (_, geo, _)) in records.iter().enumerate() {
        for k in 0..3 {
            shape[[i, k]] = i64::try_from(geo.source_shape[k])?;
        }
        let flat = |m| Array2::from_shape_vec((4, 4), mat_to_flat(m).to_vec());
        source_affine
            .slice_mut(s![i, .., ..])
            .assign(&flat(&geo.source_affine)?);
        grid_affine
            .slice_mut(s![i, .., ..])
            .assign(&flat(&geo.grid_affine)?);
        grid_to_source
            .slice_mut(s![i, .., ..])
            .assign(&flat(&geo.grid_to_source)?);
    }
    num_dataset(&group, "source_shape", &shape)?;
    num_dataset(&group, "source_affine", &source_affine)?;
    num_dataset(&group, "grid_affine", &grid_affine)?;
    let ds = num_dataset(&group, "grid_to_source", &grid_to_source)?;
    write_str_attr(
        &ds,
        "meaning",
        "grid voxel index -> source voxel index (homogeneous 4x4)",
    )?;
    str_dataset(
        &group,
        "affine_source",
        records
            .iter()
            .map(|r| affine_source_name(r.1.affine_source).to_string()),
    )?;
    Ok(())
}

fn write_str_attr(loc: &Location, name: &str, value: &str) -> Result<()> {
    let v = vlen(value)?;
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

fn write_volume_attrs(volumes: &Dataset) -> Result<()> {
    write_str_attr(
        volumes,
        "axes",
        "subject, x (left to right), y (posterior to anterior), z (inferior to superior): RAS",
    )
}

fn write_root_attrs(file: &File, header: &CorpusHeader) -> Result<()> {
    let p = &header.params;
    write_str_attr(file, "format", FORMAT_NAME)?;
    write_scalar_attr(file, "format_version", FORMAT_VERSION)?;
    let grid: Vec<u64> = p.grid.iter().map(|&g| g as u64).collect();
    file.new_attr_builder()
        .with_data(&Array1::from(grid))
        .create("grid")
        .context("attribute grid")?;
    write_scalar_attr(file, "spacing", p.spacing)?;
    let json = serde_json::to_string(p).context("preprocessing parameters")?;
    write_str_attr(file, "preprocessing", &json)?;
    write_str_attr(file, "align", &enum_name(&p.align))?;
    write_str_attr(file, "normalise", &enum_name(&p.normalise))?;
    write_str_attr(file, "tool_version", crate::TOOL_VERSION)?;
    write_str_attr(file, "creation_command", &header.creation_command)?;
    write_scalar_attr(file, "val_fraction", header.val_fraction)?;
    write_scalar_attr(file, "split_seed", header.split_seed)?;
    Ok(())
}

/// The lower-case name clap shows for a value enum (`centre`, `minmax`).
fn enum_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}
