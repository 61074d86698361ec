//! Bad input through the real binary: each case exits non-zero with one message naming the
//! file and the problem, and leaves no output behind. Fixtures are written by nibabel
//! (tests/fixtures/bad_inputs.py), the reference reader, so they are what users will have.
mod common;

use common::{mtx, run_python};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture folder, written once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::shared_dir("bad-inputs");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad_inputs.py");
        run_python(&[script, dir.to_str().expect("utf-8 temp dir")]);
        dir
    })
}

/// A fresh case folder holding a manifest with one good subject and `rows`.
fn case(name: &str, rows: &[&str]) -> PathBuf {
    let dir = fixtures().join(format!("case-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("case dir");
    let mut csv =
        String::from("subject_id,image,segmentation,diagnosis,age\nGOOD,../good.nii.gz,,CN,70\n");
    for r in rows {
        csv.push_str(r);
        csv.push('\n');
    }
    fs::write(dir.join("manifest.csv"), csv).expect("manifest");
    dir
}

const SMALL_GRID: [&str; 4] = ["--grid", "32,38,32", "--spacing", "6"];

fn pack(dir: &Path, extra: &[&str]) -> std::process::Output {
    let manifest = dir.join("manifest.csv");
    let out = dir.join("corpus.h5");
    let mut args = vec![
        "pack",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(&SMALL_GRID);
    args.extend_from_slice(extra);
    mtx(&args)
}

/// Runs pack on a manifest with one bad row and checks the failure.
fn assert_pack_fails(name: &str, row: &str, needles: &[&str]) {
    let dir = case(name, &[row]);
    let out = pack(&dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(!out.status.success(), "{name}: pack succeeded on bad input");
    for n in needles {
        assert!(
            stderr.contains(&n.to_lowercase()),
            "{name}: stderr lacks '{n}':\n{stderr}"
        );
    }
    assert!(
        !dir.join("corpus.h5").exists(),
        "{name}: an output file was left behind"
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "{name}: files left behind: {leftovers:?}"
    );
}

#[test]
fn missing_image_file() {
    assert_pack_fails(
        "missing",
        "B,../nope.nii.gz,,CN,70",
        &["nope.nii.gz", "not found"],
    );
}

#[test]
fn truncated_gzip() {
    assert_pack_fails(
        "truncated",
        "B,../truncated.nii.gz,,CN,70",
        &["truncated.nii.gz", "truncated"],
    );
}

#[test]
fn not_nifti() {
    assert_pack_fails(
        "not-nifti",
        "B,../not_nifti.nii,,CN,70",
        &["not_nifti.nii", "not a nifti"],
    );
    assert_pack_fails(
        "not-nifti-gz",
        "B,../not_nifti.nii.gz,,CN,70",
        &["not_nifti.nii.gz", "not a nifti"],
    );
}

#[test]
fn four_d_needs_a_volume() {
    assert_pack_fails(
        "four-d",
        "B,../four_d.nii.gz,,CN,70",
        &["four_d.nii.gz", "4-d", "--volume"],
    );
    let dir = case("four-d-volume", &["B,../four_d.nii.gz,,CN,70"]);
    let out = pack(&dir, &["--volume", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("corpus.h5").exists());
}

#[test]
fn bad_voxel_sizes() {
    for (name, file) in [
        ("zero", "zero_voxel"),
        ("negative", "negative_voxel"),
        ("nan", "nan_voxel"),
    ] {
        let row = format!("B,../{file}.nii.gz,,CN,70");
        assert_pack_fails(name, &row, &[&format!("{file}.nii.gz"), "voxel size"]);
    }
}

#[test]
fn singular_affine() {
    assert_pack_fails(
        "singular",
        "B,../singular.nii.gz,,CN,70",
        &["singular.nii.gz", "singular"],
    );
}

#[test]
fn non_finite_voxels() {
    assert_pack_fails(
        "nan-data",
        "B,../nan_data.nii.gz,,CN,70",
        &["nan_data.nii.gz", "nan"],
    );
}

#[test]
fn segmentation_on_another_grid() {
    assert_pack_fails(
        "seg-grid",
        "B,../good2.nii.gz,../seg_other_grid.nii.gz,CN,70",
        &["seg_other_grid.nii.gz", "segmentation"],
    );
}

#[test]
fn malformed_manifests() {
    assert_pack_fails(
        "diagnosis",
        "B,../good2.nii.gz,,XYZ,70",
        &["manifest.csv", "diagnosis", "XYZ"],
    );
    assert_pack_fails("age", "B,../good2.nii.gz,,CN,old", &["manifest.csv", "age"]);
    assert_pack_fails(
        "duplicate",
        "GOOD,../good2.nii.gz,,CN,70",
        &["manifest.csv", "duplicate", "GOOD"],
    );
    let dir = case("empty", &[]);
    fs::write(dir.join("manifest.csv"), "").unwrap();
    let out = pack(&dir, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest.csv"));
    assert!(!dir.join("corpus.h5").exists());
}

#[test]
fn output_folder_must_exist_and_corpus_is_not_overwritten() {
    let dir = case("outdir", &[]);
    let manifest = dir.join("manifest.csv");
    let missing = dir.join("no-such-folder").join("c.h5");
    let out = mtx(&[
        "pack",
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-folder"));

    let existing = dir.join("corpus.h5");
    fs::write(&existing, b"precious").unwrap();
    let out = pack(&dir, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(fs::read(&existing).unwrap(), b"precious");
    let out = pack(&dir, &["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(fs::read(&existing).unwrap(), b"precious");
}

#[test]
fn skip_bad_writes_the_rest_and_names_the_skipped() {
    let dir = case(
        "skip-bad",
        &[
            "B,../truncated.nii.gz,,CN,70",
            "C,../good2.nii.gz,,AD,75",
            "D,../nan_data.nii.gz,,CN,60",
        ],
    );
    let out = pack(&dir, &["--skip-bad"]);
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    for needle in ["truncated.nii.gz", "nan_data.nii.gz", "skipped"] {
        assert!(
            stderr.to_lowercase().contains(needle),
            "output lacks '{needle}':\n{stderr}"
        );
    }
    let corpus = dir.join("corpus.h5");
    let ids = run_python(&[
        "-c",
        "import h5py,sys; f=h5py.File(sys.argv[1]); print(sorted(x.decode() if isinstance(x, bytes) else x for x in f['subjects/id'][()]))",
        corpus.to_str().unwrap(),
    ]);
    assert_eq!(ids.trim(), "['C', 'GOOD']");
}

#[test]
fn inspect_refuses_another_format_version() {
    let dir = case("version", &[]);
    let out = pack(&dir, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let corpus = dir.join("corpus.h5");
    run_python(&[
        "-c",
        "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); f.attrs['format_version']=99",
        corpus.to_str().unwrap(),
    ]);
    let out = mtx(&["inspect", corpus.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("corpus.h5") && stderr.contains("99"),
        "{stderr}"
    );
}
