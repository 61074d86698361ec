//! Preprocessing of single subjects against files written by nibabel: orientation (markers at
//! known world positions must land where the grid affine says), the reader's affines and
//! scaling against nibabel's, resampling, label maps, normalisation, and every bad input.
use mtx_hpc::data::geometry::{self, Mat4};
use mtx_hpc::data::nifti::read::{read_image, read_labels};
use mtx_hpc::data::preprocess::{
    AffineSource, Align, Normalise, PackParams, Prepared, prepare_subject,
};
use std::path::{Path, PathBuf};
use std::process::Command;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/nifti_cases.py");

/// Writes one family of test files with nibabel into a fresh temporary folder.
fn cases(kind: &str) -> tempfile::TempDir {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: run scripts/setup.sh to create the Python environment"
    );
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = Command::new(PYTHON)
        .args([CASES, kind])
        .arg(dir.path())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "nifti_cases.py {kind} failed (run scripts/setup.sh?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn params(spacing: f64, grid: [usize; 3]) -> PackParams {
    PackParams {
        spacing,
        grid,
        align: Align::Centre,
        normalise: Normalise::Minmax,
        volume: None,
    }
}

fn at(grid: [usize; 3], x: usize, y: usize, z: usize) -> usize {
    (x * grid[1] + y) * grid[2] + z
}

/// Value-weighted centroid of the grid voxels within `radius` of `around` (grid voxels), and
/// the total weight.
fn centroid(vol: &[f32], grid: [usize; 3], around: [f64; 3], radius: i64) -> ([f64; 3], f64) {
    let c = around.map(|v| v.round() as i64);
    let (mut sum, mut mass) = ([0.0f64; 3], 0.0f64);
    for x in c[0] - radius..=c[0] + radius {
        for y in c[1] - radius..=c[1] + radius {
            for z in c[2] - radius..=c[2] + radius {
                let p = [x, y, z];
                if (0..3).any(|a| p[a] < 0 || p[a] >= grid[a] as i64) {
                    continue;
                }
                let v = f64::from(vol[at(grid, x as usize, y as usize, z as usize)]);
                if v > 0.3 {
                    for a in 0..3 {
                        sum[a] += v * p[a] as f64;
                    }
                    mass += v;
                }
            }
        }
    }
    (sum.map(|s| s / mass.max(1e-9)), mass)
}

fn json_mat(v: &serde_json::Value) -> Mat4 {
    let mut m = geometry::IDENTITY;
    for r in 0..4 {
        for c in 0..4 {
            m[r][c] = v[r][c].as_f64().expect("number");
        }
    }
    m
}

fn load_cases(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    match serde_json::from_str(&text).expect("json") {
        serde_json::Value::Object(m) => m,
        _ => panic!("cases.json is not an object"),
    }
}

#[test]
fn markers_land_where_their_world_coordinates_say_in_every_orientation() {
    let dir = cases("orient");
    let grid = [96, 114, 96];
    let mut failures = Vec::new();
    for (name, case) in load_cases(dir.path()) {
        let file = PathBuf::from(case["file"].as_str().expect("file"));
        let prep: Prepared = prepare_subject(&file, None, &params(2.0, grid))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let expected_source = match case["source"].as_str() {
            Some("sform") => AffineSource::Sform,
            Some("qform") => AffineSource::Qform,
            _ => AffineSource::VoxelSizes,
        };
        if prep.geometry.affine_source != expected_source {
            failures.push(format!(
                "{name}: affine source {:?}, expected {expected_source:?}",
                prep.geometry.affine_source
            ));
        }
        let has_warning = prep.warnings.iter().any(|w| w.contains("both 0"));
        if has_warning != (expected_source == AffineSource::VoxelSizes) {
            failures.push(format!("{name}: warnings {:?}", prep.warnings));
        }
        let to_grid = geometry::inverse(&prep.geometry.grid_affine).expect("grid affine");
        for (k, m) in case["markers"]
            .as_array()
            .expect("markers")
            .iter()
            .enumerate()
        {
            let world = [0, 1, 2].map(|a| m[a].as_f64().expect("number"));
            let expected = geometry::apply(&to_grid, world);
            let (found, mass) = centroid(&prep.volume, grid, expected, 3);
            let off = (0..3)
                .map(|a| (found[a] - expected[a]).abs())
                .fold(0.0, f64::max);
            if mass < 4.0 || off > 0.75 {
                failures.push(format!(
                    "{name}: marker {k} at world {world:?} expected at grid {expected:.2?}, \
                     found {found:.2?} (mass {mass:.1})"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reader_agrees_with_nibabel_on_affines_and_scaled_values() {
    let dir = cases("orient");
    for (name, case) in load_cases(dir.path()) {
        let file = PathBuf::from(case["file"].as_str().expect("file"));
        let img = read_image(&file, None).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want = json_mat(&case["affine"]);
        for r in 0..4 {
            for c in 0..4 {
                assert!(
                    (img.affine[r][c] - want[r][c]).abs() < 1e-4,
                    "{name}: affine {:?} vs nibabel {:?}",
                    img.affine,
                    want
                );
            }
        }
        assert_eq!(
            geometry::axcodes(&img.affine),
            case["axcodes"].as_str().expect("codes").to_string(),
            "{name}"
        );
        let p: Vec<usize> = case["probe_voxel"]
            .as_array()
            .expect("probe")
            .iter()
            .map(|v| v.as_u64().expect("index") as usize)
            .collect();
        let idx = p[0] + img.dims[0] * (p[1] + img.dims[1] * p[2]);
        let want = case["probe_value"].as_f64().expect("value");
        assert!(
            (f64::from(img.data[idx]) - want).abs() < 1e-3,
            "{name}: voxel {p:?} = {}, nibabel says {want}",
            img.data[idx]
        );
    }
}

#[test]
fn analyze_pair_and_uncompressed_files_read() {
    let dir = cases("bad");
    let a = read_image(&dir.path().join("pair.hdr"), None).expect("pair reads");
    let b = read_image(&dir.path().join("good.nii"), None).expect(".nii reads");
    let c = read_image(&dir.path().join("good.nii.gz"), None).expect(".nii.gz reads");
    assert_eq!(a.data, c.data);
    assert_eq!(b.data, c.data);
    // The big-endian int16 file holds the same values.
    let e = read_image(&dir.path().join("big_endian.nii.gz"), None).expect("big-endian reads");
    assert!(e.header.endianness == nifti::Endianness::Big);
    for (x, y) in e.data.iter().zip(&c.data) {
        assert!((x - y).abs() < 0.01, "big-endian {x} vs {y}");
    }
    assert_eq!(a.dims, [20, 20, 20]);
    let text =
        mtx_hpc::data::nifti::read::describe(&dir.path().join("good.nii.gz")).expect("describe");
    for want in ["float32", "RAS", "20 x 20 x 20", "sform_code", "percentile"] {
        assert!(text.contains(want), "describe lacks {want}:\n{text}");
    }
}

#[test]
fn linear_ramp_stays_linear_through_oblique_downsampling() {
    let dir = cases("ramp");
    let grid = [64, 64, 56];
    let prep = prepare_subject(&dir.path().join("ramp.nii.gz"), None, &params(2.0, grid))
        .expect("prepares");
    let v = &prep.volume;
    let to_world = prep.geometry.grid_affine;
    let mut checked = 0;
    let mut worst = 0.0f32;
    for x in 1..grid[0] - 1 {
        for y in 0..grid[1] {
            for z in 0..grid[2] {
                // Well inside the ramp's box (|x|,|y| <= 60, |z| <= 50 mm) and unclipped.
                let w = geometry::apply(&to_world, [x as f64, y as f64, z as f64]);
                if w[0].abs() > 50.0 || w[1].abs() > 52.0 || w[2].abs() > 42.0 {
                    continue;
                }
                let (a, b, c) = (
                    v[at(grid, x - 1, y, z)],
                    v[at(grid, x, y, z)],
                    v[at(grid, x + 1, y, z)],
                );
                if a <= 0.0 || c >= 1.0 {
                    continue;
                }
                worst = worst.max((a - 2.0 * b + c).abs());
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000, "only {checked} interior voxels");
    assert!(worst < 2e-4, "second difference up to {worst}");
    // And the slope is the world slope: 2 mm per voxel over the clip range.
    let s = prep.intensity;
    let (x, y, z) = (32, 32, 28);
    let slope = v[at(grid, x + 1, y, z)] - v[at(grid, x, y, z)];
    let want = 2.0 / (s.clip_high - s.clip_low);
    assert!(
        (slope - want).abs() < 1e-3 * want.abs() + 1e-5,
        "slope {slope} vs {want}"
    );
}

#[test]
fn label_map_keeps_only_its_labels_and_a_one_voxel_label_survives_3mm() {
    let dir = cases("labels");
    let grid = [32, 32, 32];
    let prep = prepare_subject(
        &dir.path().join("image.nii.gz"),
        Some(&dir.path().join("labels.nii.gz")),
        &params(3.0, grid),
    )
    .expect("prepares");
    let labels = prep.labels.expect("labels");
    assert_eq!(labels.len(), 32 * 32 * 32);
    let mut seen = [0usize; 256];
    for &l in &labels {
        seen[usize::from(l)] += 1;
    }
    for (l, &n) in seen.iter().enumerate() {
        assert!(
            n == 0 || [0, 1, 2, 4].contains(&l),
            "label {l} appeared {n} times"
        );
    }
    assert!(
        seen[1] > 0 && seen[2] > 0 && seen[4] > 0,
        "{:?}",
        &seen[..5]
    );
    // The lone voxel at world (20, -15, 10) must still be there, within a voxel.
    let to_grid = geometry::inverse(&prep.geometry.grid_affine).expect("grid");
    let g = geometry::apply(&to_grid, [20.0, -15.0, 10.0]).map(|v| v.round() as i64);
    let mut found = false;
    for dx in -1..=1 {
        for dy in -1..=1 {
            for dz in -1..=1 {
                let p = [g[0] + dx, g[1] + dy, g[2] + dz].map(|v| v as usize);
                found |= labels[at(grid, p[0], p[1], p[2])] == 4;
            }
        }
    }
    assert!(
        found,
        "the one-voxel label 4 vanished at 3 mm (grid position {g:?})"
    );
}

#[test]
fn normalisation_follows_the_foreground_percentiles() {
    let dir = cases("grid");
    let grid = [96, 114, 96];
    let bytes = std::fs::read(dir.path().join("grid.f32")).expect("reference values");
    let src: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut p = params(2.0, grid);
    p.align = Align::World;
    let file = dir.path().join("grid.nii.gz");
    let prep = prepare_subject(&file, None, &p).expect("prepares");
    // The file sits exactly on the world grid: resampling is the identity.
    let s = prep.intensity;
    let mut fg: Vec<f32> = src.iter().copied().filter(|&v| v > s.threshold).collect();
    assert_eq!(fg.len(), s.foreground_voxels);
    fg.sort_by(f32::total_cmp);
    let pct = |q: f64| {
        let r = q * (fg.len() - 1) as f64;
        let (i, f) = (r.floor() as usize, (r - r.floor()) as f32);
        fg[i] + (fg[(i + 1).min(fg.len() - 1)] - fg[i]) * f
    };
    assert!(
        (pct(0.005) - s.clip_low).abs() < 1e-3,
        "{} vs {}",
        pct(0.005),
        s.clip_low
    );
    assert!(
        (pct(0.995) - s.clip_high).abs() < 1e-3,
        "{} vs {}",
        pct(0.995),
        s.clip_high
    );
    for (i, (&v, &o)) in src.iter().zip(&prep.volume).enumerate() {
        let want = ((v - s.clip_low) / (s.clip_high - s.clip_low)).clamp(0.0, 1.0);
        assert!((o - want).abs() < 1e-4, "voxel {i}: {o} vs {want}");
    }
    assert!(prep.volume.iter().all(|v| (0.0..=1.0).contains(v)));

    p.normalise = Normalise::Zscore;
    let z = prepare_subject(&file, None, &p).expect("prepares");
    let vals: Vec<f64> = src
        .iter()
        .zip(&z.volume)
        .filter(|(v, _)| **v > s.threshold)
        .map(|(_, &o)| f64::from(o))
        .collect();
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / vals.len() as f64;
    assert!(mean.abs() < 1e-3, "z-score mean {mean}");
    assert!(
        (var.sqrt() - 1.0).abs() < 1e-3,
        "z-score std {}",
        var.sqrt()
    );
}

#[test]
fn four_d_needs_a_volume_and_the_chosen_one_is_read() {
    let dir = cases("bad");
    let f = dir.path().join("four_d.nii.gz");
    let e = format!("{:#}", read_image(&f, None).expect_err("4-D must fail"));
    assert!(
        e.contains("4-D image with 3 volumes") && e.contains("--volume"),
        "{e}"
    );
    let img = read_image(&f, Some(2)).expect("volume 2 reads");
    assert_eq!(img.data[10 + 20 * (10 + 20 * 10)], 300.0);
    let e = format!("{:#}", read_image(&f, Some(3)).expect_err("out of range"));
    assert!(e.contains("out of range"), "{e}");
    let mut p = params(2.0, [16, 16, 16]);
    p.volume = Some(1);
    prepare_subject(&f, None, &p).expect("prepare with --volume works");
}

#[test]
fn bad_files_get_one_clear_message_naming_file_and_problem() {
    let dir = cases("bad");
    let d = dir.path();
    let table = [
        ("missing.nii.gz", "file not found"),
        ("truncated.nii.gz", "truncated"),
        ("truncated_data.nii", "truncated: the header promises"),
        ("text.nii.gz", "not a NIfTI file"),
        ("random.nii.gz", "not a NIfTI file"),
        ("zero_voxel.nii.gz", "zero voxel size"),
        ("negative_voxel.nii.gz", "negative voxel size"),
        ("nan_voxel.nii.gz", "NaN voxel size"),
        ("singular.nii.gz", "singular affine"),
        ("nan_voxels.nii.gz", "3 of 8000 voxels are NaN or infinite"),
        ("complex.nii.gz", "unsupported datatype"),
        ("four_d.nii.gz", "4-D image"),
    ];
    let mut failures = Vec::new();
    for (file, want) in table {
        let path = d.join(file);
        match prepare_subject(&path, None, &params(2.0, [16, 16, 16])) {
            Ok(_) => failures.push(format!("{file}: accepted")),
            Err(e) => {
                let msg = format!("{e:#}");
                if !msg.contains(want) || !msg.contains(file) {
                    failures.push(format!(
                        "{file}: message {msg:?} lacks {want:?} or the file name"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn segmentation_on_another_grid_or_with_fractions_is_rejected() {
    let dir = cases("labels");
    let d = dir.path();
    let image = d.join("image.nii.gz");
    for (seg, want) in [
        ("labels_shifted.nii.gz", "different affine"),
        ("labels_shape.nii.gz", "has shape"),
        ("labels_fraction.nii.gz", "not a label map"),
    ] {
        let e = prepare_subject(&image, Some(&d.join(seg)), &params(3.0, [32, 32, 32]))
            .expect_err("must fail");
        let msg = format!("{e:#}");
        assert!(msg.contains(want) && msg.contains(seg), "{seg}: {msg}");
        if want != "not a label map" {
            assert!(
                msg.contains("image.nii.gz"),
                "{seg}: names only one file: {msg}"
            );
        }
    }
    read_labels(&d.join("labels.nii.gz")).expect("good labels read");
}

#[test]
fn prepare_image_on_f32_voxels_matches_prepare_subject_on_the_file() {
    let dir = cases("labels");
    let file = dir.path().join("image.nii.gz");
    let seg = dir.path().join("labels.nii.gz");
    let p = params(2.5, [40, 36, 32]);
    let a = prepare_subject(&file, Some(&seg), &p).expect("from the file");
    let img = read_image(&file, None).expect("reads");
    let labels = read_labels(&seg).expect("reads");
    let b = mtx_hpc::data::preprocess::prepare_image(&img, Some(&labels), &p).expect("from f32");
    assert_eq!(a.volume, b.volume);
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.geometry, b.geometry);
}
