//! Seconds per subject for `prepare_subject` (read, reorient + resample to 2 mm, place in the
//! 96 x 114 x 96 grid, normalise) on Colin27 and a synthetic int16 256^3 LIA volume with a
//! scale slope, median of several runs; the nibabel + scipy baseline runs beside it.
//!
//!     RAYON_NUM_THREADS=1 cargo bench --bench preprocess
use mtx_hpc::data::geometry;
use mtx_hpc::data::nifti::read::read_raw;
use mtx_hpc::data::preprocess::{
    Align, Normalise, PackParams, foreground, grid_affine, normalise, prepare_subject, resample,
    source::SourceVolume,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/preprocess_nibabel.py");
const COLIN: &str = "/usr/share/mricron/templates/ch2.nii.gz";
const RUNS: usize = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut()>(mut f: F) -> (f64, f64) {
    f();
    let times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    (median(times), min)
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join("mtx-hpc-bench");
    std::fs::create_dir_all(&dir)?;
    let synth = dir.join("synth_int16_256_lia.nii.gz");
    if !synth.exists() {
        let ok = Command::new(PYTHON)
            .args([BASELINE, "make-synth"])
            .arg(&synth)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        anyhow::ensure!(
            ok,
            "could not make {} (run scripts/setup.sh)",
            synth.display()
        );
    }
    // `cargo bench --bench preprocess -- ch2` runs only matching files, without the baseline.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let files: Vec<PathBuf> = vec![PathBuf::from(COLIN), synth]
        .into_iter()
        .filter(|f| {
            only.is_empty()
                || only
                    .iter()
                    .any(|o| f.to_string_lossy().contains(o.as_str()))
        })
        .collect();
    let params = PackParams {
        spacing: 2.0,
        grid: [96, 114, 96],
        align: Align::Centre,
        normalise: Normalise::Minmax,
        volume: None,
    };
    println!(
        "threads: {} (set RAYON_NUM_THREADS=1 for the one-core figure)",
        rayon::current_num_threads()
    );
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (read, _) = time(|| {
            read_raw(f, None).map(|r| r.bytes.len()).unwrap_or(0);
        });
        let (gz, _) = time(|| {
            mtx_hpc::data::nifti::read::read_maybe_gz(f)
                .map(|b| b.len())
                .unwrap_or(0);
        });
        println!("  decompress only {gz:.4}");
        // Where the time goes, step by step (the same calls prepare_subject makes).
        let raw = read_raw(f, None)?;
        let src = SourceVolume::Raw(&raw);
        let (convert, _) = time(|| {
            raw.check_finite().ok();
        });
        let (find, _) = time(|| {
            foreground::find(&foreground::Samples::take(&src), &raw.affine);
        });
        let samples = foreground::Samples::take(&src);
        let fg = foreground::find(&samples, &raw.affine);
        let g = grid_affine(fg.centre_world, params.spacing, params.grid);
        let (crop, _) = time(|| {
            foreground::cropping(&samples, &raw.affine, fg.threshold, &g, params.grid);
        });
        let m = geometry::mul(
            &geometry::inverse(&raw.affine).unwrap_or(geometry::IDENTITY),
            &g,
        );
        let widths = resample::filter_widths(params.spacing, geometry::voxel_sizes(&raw.affine));
        let (res, _) = time(|| {
            resample::resample_intensity(&src, &m, params.grid, widths);
        });
        let vol = resample::resample_intensity(&src, &m, params.grid, widths);
        let fov = vec![true; vol.len()];
        let (norm, _) = time(|| {
            let mut v = vol.clone();
            normalise::apply(&mut v, &fov, fg.threshold, Normalise::Minmax).ok();
        });
        println!(
            "  steps: read+decompress {read:.4}  finite check {convert:.4}  foreground {find:.4}  \
             cropping {crop:.4}  resample {res:.4}  normalise {norm:.4}"
        );
        let (med, min) = time(|| {
            prepare_subject(Path::new(f), None, &params)
                .map(|p| p.volume.len())
                .unwrap_or(0);
        });
        prepare_subject(f, None, &params)?;
        println!("mtx-hpc        {name:<28} median {med:.4} s  (min {min:.4}, {RUNS} runs)");
    }
    if !only.is_empty() {
        return Ok(());
    }
    let status = Command::new(PYTHON)
        .arg(BASELINE)
        .arg("bench")
        .args(&files)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("nibabel baseline failed (run scripts/setup.sh)");
    }
    Ok(())
}
