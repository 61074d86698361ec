//! Helpers shared by the integration tests: synthetic preprocessed subjects written straight
//! through the corpus writer, running the binary, running the project's Python.
#![allow(dead_code)]
use mtx_hpc::data::corpus::{CorpusHeader, CorpusWriter, SubjectMeta};
use mtx_hpc::data::geometry::IDENTITY;
use mtx_hpc::data::preprocess::{
    AffineSource, Align, IntensityStats, Normalise, PackGeometry, PackParams, Prepared,
};
use mtx_hpc::io::AtomicFile;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

pub fn python() -> &'static str {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: run scripts/setup.sh to create the Python environment"
    );
    PYTHON
}

pub fn params(grid: [usize; 3]) -> PackParams {
    PackParams {
        spacing: 2.0,
        grid,
        align: Align::Centre,
        normalise: Normalise::Minmax,
        volume: None,
    }
}

pub fn header(grid: [usize; 3]) -> CorpusHeader {
    CorpusHeader {
        params: params(grid),
        creation_command: "mtx-hpc pack --manifest m.csv --out c.h5".into(),
        val_fraction: 0.25,
        split_seed: 5,
    }
}

/// Subject `k`: a smooth ramp with a per-subject offset, a label cube when `with_labels`.
pub fn prepared(k: usize, grid: [usize; 3], with_labels: bool) -> Prepared {
    let [x, y, z] = grid;
    let mut volume = Vec::with_capacity(x * y * z);
    let mut labels = vec![0u8; x * y * z];
    for i in 0..x {
        for j in 0..y {
            for l in 0..z {
                volume.push(
                    (i + 2 * j + 3 * l) as f32 / (x + 2 * y + 3 * z) as f32 + k as f32 * 0.01,
                );
                let idx = (i * y + j) * z + l;
                if (2..4).contains(&i) && (2..4).contains(&j) {
                    labels[idx] = [1u8, 2, 4][l % 3];
                }
            }
        }
    }
    let mut source_affine = IDENTITY;
    source_affine[0][0] = -1.0;
    source_affine[0][3] = 90.0 + k as f64;
    let mut grid_affine = IDENTITY;
    for d in 0..3 {
        grid_affine[d][d] = 2.0;
        grid_affine[d][3] = -(grid[d] as f64);
    }
    let mut grid_to_source = IDENTITY;
    grid_to_source[1][3] = 0.5 * k as f64;
    Prepared {
        volume,
        labels: with_labels.then_some(labels),
        geometry: PackGeometry {
            source_shape: [x * 2 + k, y * 2, z * 2],
            source_affine,
            affine_source: if k % 2 == 0 {
                AffineSource::Sform
            } else {
                AffineSource::Qform
            },
            grid_affine,
            grid_to_source,
        },
        intensity: IntensityStats {
            threshold: 0.1,
            foreground_voxels: x * y * z,
            clip_low: 0.0,
            clip_high: 1.0,
            mean: 0.5,
            std: 0.2,
        },
        warnings: vec![],
    }
}

pub fn meta(k: usize) -> SubjectMeta {
    SubjectMeta {
        id: format!("S{k:03}"),
        session: if k == 1 {
            "ses-02".into()
        } else {
            String::new()
        },
        source_file: format!("S{k:03}.nii.gz"),
        source_checksum: format!("{k:064x}"),
        age: if k == 2 { None } else { Some(20.5 + k as f32) },
        sex: ["M", "F", ""][k % 3].into(),
        diagnosis: ["CN", "AD", "MCI", ""][k % 4].into(),
        site: format!("site{}", k % 2),
    }
}

/// Writes `n` synthetic subjects; those with k % 2 == 1 carry labels when `labels`.
pub fn write_corpus(path: &Path, grid: [usize; 3], n: usize, labels: bool) -> PathBuf {
    let out = AtomicFile::new(path, true).expect("atomic file");
    let mut w = CorpusWriter::create(out, path, header(grid), n).expect("create");
    for k in 0..n {
        w.push(meta(k), &prepared(k, grid, labels && k % 2 == 1))
            .expect("push");
    }
    w.finish().expect("finish")
}

/// A fresh directory for data that the tests of one binary share (a corpus made once in a
/// `OnceLock`), named `mtx-<tag>-XXXXXX` in the temp folder and removed when the test binary
/// exits, passed or failed: statics are never dropped, so a `TempDir` kept in one would stay
/// on disk after every run. `MTX_KEEP_TEST_DIRS=1` keeps them, to look at after a failure.
pub fn shared_dir(tag: &str) -> PathBuf {
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        if std::env::var_os("MTX_KEEP_TEST_DIRS").is_some() {
            return;
        }
        let dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("mtx-{tag}-"))
        .tempdir()
        .expect("temp dir")
        .keep();
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `remove_all` is a plain function that stays valid for the life of the process.
    if dirs.is_empty() && unsafe { libc::atexit(remove_all) } != 0 {
        panic!("cannot register the removal of {} at exit", dir.display());
    }
    dirs.push(dir.clone());
    dir
}

/// Runs `mtx-hpc` with `args`.
pub fn mtx(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .args(args)
        .output()
        .expect("cannot start mtx-hpc")
}

/// Runs the project's Python with `args`, panics with its stderr on failure, returns stdout.
pub fn run_python(args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .args(args)
        .output()
        .expect("cannot start python");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Opens an HDF5 file without file locks, as the product does: tests in one process run in
/// threads while others fork children, and HDF5's lock would leak into those children.
pub fn h5_open(path: &Path, write: bool) -> hdf5::File {
    let mut b = hdf5::File::with_options();
    b.with_fapl(|p| p.file_locking(false));
    if write { b.open_rw(path) } else { b.open(path) }.expect("open HDF5 file")
}

/// `mtx-hpc synth <synth_args> --out SYNTH`, then `pack` of its manifest at the tiny preset's
/// grid (32x38x32, 6 mm) into `corpus` with `pack_args`, through the binary; panics with the
/// tool's output when either fails.
pub fn synth_and_pack_tiny(synth: &Path, corpus: &Path, synth_args: &[&str], pack_args: &[&str]) {
    let run = |args: Vec<&str>| {
        let out = mtx(&args);
        assert!(
            out.status.success(),
            "mtx-hpc {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut args = vec!["synth"];
    args.extend_from_slice(synth_args);
    args.extend(["--out", synth.to_str().unwrap()]);
    run(args);
    let manifest = synth.join("manifest.csv");
    let mut args = vec![
        "pack",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        corpus.to_str().unwrap(),
        "--grid",
        "32,38,32",
        "--spacing",
        "6",
    ];
    args.extend_from_slice(pack_args);
    run(args);
}

/// Synthesises `subjects` healthy subjects in `dir/h` and packs them at the tiny preset's grid
/// (32x38x32, 6 mm, 20 % validation) into `dir/tiny.h5`, through the binary.
pub fn tiny_corpus(dir: &Path, subjects: usize, seed: u64) -> PathBuf {
    let corpus = dir.join("tiny.h5");
    let (n, s) = (subjects.to_string(), seed.to_string());
    synth_and_pack_tiny(
        &dir.join("h"),
        &corpus,
        &["--cohort", "healthy", "--subjects", &n, "--seed", &s],
        &["--val-fraction", "0.2"],
    );
    corpus
}

/// Smooth blobs plus noise over `b` volumes of `grid` (stream (seed, "test-volumes")): instance
/// norms see real variation and max-pool meets no exact ties. The model gradient tests use it.
pub fn blob_volumes(grid: [usize; 3], b: usize, seed: u64) -> Vec<f32> {
    let mut r = mtx_hpc::rng::keyed(seed, &[], "test-volumes");
    let [x, y, z] = grid;
    let mut out = Vec::with_capacity(b * x * y * z);
    for s in 0..b {
        let f = 0.2 + 0.1 * s as f32;
        for i in 0..x {
            for j in 0..y {
                for k in 0..z {
                    let v = ((i as f32 * f).sin() * (j as f32 * 0.3).cos()
                        + (k as f32 * 0.17).sin())
                        * 0.25
                        + 0.5
                        + 0.05 * mtx_hpc::rng::unit(&mut r) as f32;
                    out.push(v);
                }
            }
        }
    }
    out
}

/// A pretraining checkpoint of `preset` holding its initial parameters (seed 1), written as
/// `DIR/<preset>.h5`: what fine-tuning tests start from.
pub fn pretraining_checkpoint(dir: &Path, preset: mtx_hpc::model::Preset) -> PathBuf {
    use mtx_hpc::model::{Layout, ModelConfig, init};
    use mtx_hpc::train::{Checkpoint, CheckpointMeta, RunConfig, Stage};
    let model = ModelConfig::preset(preset);
    let layout = Layout::new(&model);
    let path = dir.join(format!("{preset}.h5"));
    let meta = CheckpointMeta {
        stage: Stage::Mevp,
        step: 1,
        epoch: 1,
        best_val_loss: None,
        stale_epochs: 0,
        model,
        run: RunConfig {
            preset,
            ..RunConfig::default()
        },
        corpus_checksum: "0".repeat(64),
    };
    Checkpoint::write(
        &path,
        &layout,
        &init::init_params(&layout, 1),
        None,
        None,
        &meta,
    )
    .unwrap();
    path
}
