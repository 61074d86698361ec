//! `mtx-hpc synth` end to end: the built binary, byte-identical output per seed, refusing to
//! overwrite, and files that nibabel reads with the geometry, types and scaling we intended.
use mtx_hpc::cli::Cohort;
use mtx_hpc::data::nifti::write::{Encoding, write_nifti};
use mtx_hpc::data::synth::cohort::plan_subject;
use mtx_hpc::data::synth::random::subject_rng;
use mtx_hpc::data::synth::scanner::random_grid;
use mtx_hpc::data::synth::subject_geometry;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

fn synth(out: &Path, extra: &[&str]) -> Output {
    synth_on_threads(out, extra, 2)
}

fn synth_on_threads(out: &Path, extra: &[&str], threads: usize) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .arg("synth")
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("the binary runs")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("output folder")
        .map(|e| {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("readable"))
        })
        .collect();
    v.sort();
    v
}

fn ids(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("manifest.csv")).expect("manifest");
    text.lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn same_seed_same_bytes_and_nothing_overwritten_by_accident() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let args = [
        "--cohort",
        "clinical",
        "--subjects",
        "2",
        "--tumour-fraction",
        "0.6",
        "--seed",
        "11",
    ];
    ok(synth(&a, &args));
    ok(synth_on_threads(&b, &args, 1));
    let (fa, fb) = (files(&a), files(&b));
    assert!(
        fa.iter().any(|(n, _)| n.ends_with("_seg.nii.gz")),
        "no tumour among {:?}",
        fa.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert_eq!(fa.len(), fb.len());
    for ((na, da), (nb, db)) in fa.iter().zip(&fb) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "{na} differs between 2 threads and 1 with the same seed"
        );
    }

    let mut other = args;
    other[7] = "12";
    ok(synth(&c, &other));
    let fc = files(&c);
    let image = |f: &[(String, Vec<u8>)]| f.iter().find(|(n, _)| n == "CL0000.nii.gz").cloned();
    assert!(
        image(&fa) != image(&fc),
        "another seed gave the same subject"
    );

    let again = synth(&a, &args);
    assert!(!again.status.success(), "overwrote without --force");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(files(&a) == fa, "a refused run changed the folder");
    ok(synth(&a, &[&args[..], &["--force"]].concat()));
    assert!(
        files(&a) == fa,
        "--force with the same seed changed the files"
    );

    let healthy = tmp.path().join("h");
    ok(synth(
        &healthy,
        &["--cohort", "healthy", "--subjects", "2", "--seed", "11"],
    ));
    let (hc, cl) = (ids(&healthy), ids(&a));
    assert_eq!(hc, ["HC0000", "HC0001"]);
    assert!(hc.iter().all(|h| !cl.contains(h)), "{hc:?} vs {cl:?}");

    let orphan = tmp.path().join("missing").join("out");
    let err = synth(&orphan, &["--cohort", "healthy", "--subjects", "1"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("does not exist"));
}

const NIBABEL_CHECK: &str = r#"
import csv, json, sys, os
import numpy as np, nibabel as nib
folder, intended = sys.argv[1], json.load(open(sys.argv[2]))
rows = list(csv.DictReader(open(os.path.join(folder, "manifest.csv"))))
assert [r["subject_id"] for r in rows] == sorted(intended), (rows, list(intended))
assert set(rows[0]) == {"subject_id","session","image","age","sex","diagnosis","site","segmentation"}
seen = set()
for r in rows:
    want = intended[r["subject_id"]]
    img = nib.load(os.path.join(folder, r["image"]))
    assert img.shape == tuple(want["dims"]), (img.shape, want["dims"])
    dtype = str(img.get_data_dtype())
    assert dtype in ("int16", "float32"), dtype
    aff = np.array(want["affine"])
    assert np.allclose(img.affine, aff, atol=1e-4), (img.affine, aff)
    assert np.allclose(img.get_qform(), aff, atol=1e-3), (img.get_qform(), aff)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) in (1, 2)
    raw = np.asanyarray(img.dataobj.get_unscaled()).astype(np.float64)
    data = img.get_fdata()
    slope = img.dataobj.slope
    assert np.allclose(data, raw * slope + img.dataobj.inter, rtol=1e-6, atol=1e-6)
    if dtype == "int16" and slope != 1:
        assert raw.max() > 8000, "the slope should spread the range over int16"
    # Scanner units: white matter sits near the site's gain whatever the encoding.
    wm = np.percentile(data, 99)
    assert 300 < wm < 3000, wm
    seen.add((dtype, float(slope)))
    assert 55 <= float(r["age"]) <= 90 and r["sex"] in ("M", "F")
    assert r["diagnosis"] in ("CN", "AD") and r["site"].startswith("SITE-") and r["session"]
    if want["tumour"]:
        seg = nib.load(os.path.join(folder, r["segmentation"]))
        assert str(seg.get_data_dtype()) == "uint8"
        assert seg.shape == img.shape and np.allclose(seg.affine, img.affine, atol=1e-6)
        labels = np.asanyarray(seg.dataobj)
        assert set(np.unique(labels)) == {0, 1, 2, 4}, np.unique(labels)
        core, rim = data[labels == 1].mean(), data[labels == 4].mean()
        assert core < 0.5 * rim, (core, rim)
    else:
        assert r["segmentation"] == ""
        assert not os.path.exists(os.path.join(folder, r["subject_id"] + "_seg.nii.gz"))
print("nibabel ok", sorted(seen))
"#;

#[test]
fn nibabel_reads_what_we_meant_to_write() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: run scripts/setup.sh to create the Python environment the tests need"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("clinical");
    let (n, seed, fraction) = (4, 5u64, 0.5);
    ok(synth(
        &out,
        &[
            "--cohort",
            "clinical",
            "--subjects",
            &n.to_string(),
            "--seed",
            &seed.to_string(),
            "--tumour-fraction",
            &fraction.to_string(),
        ],
    ));
    let mut intended = serde_json::Map::new();
    for i in 0..n {
        let plan = plan_subject(seed, Cohort::Clinical, i, fraction);
        let g = subject_geometry(seed, Cohort::Clinical, &plan);
        intended.insert(
            plan.id.clone(),
            serde_json::json!({
                "dims": g.grid.dims,
                "affine": g.grid.affine,
                "tumour": plan.tumour,
            }),
        );
    }
    assert!(intended.values().any(|v| v["tumour"] == true));
    let spec: PathBuf = tmp.path().join("intended.json");
    std::fs::write(&spec, serde_json::Value::Object(intended).to_string()).expect("write json");
    let run = Command::new(PYTHON)
        .args(["-c", NIBABEL_CHECK])
        .arg(&out)
        .arg(&spec)
        .output()
        .expect("python runs");
    assert!(
        run.status.success(),
        "nibabel check failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&run.stdout));
}

const QFORM_CHECK: &str = r#"
import json, sys, os
import numpy as np, nibabel as nib
folder, intended = sys.argv[1], json.load(open(sys.argv[2]))
codes = set()
for name, aff in intended.items():
    img = nib.load(os.path.join(folder, name))
    aff = np.array(aff)
    assert np.allclose(img.affine, aff, atol=1e-4), (name, img.affine, aff)
    assert np.allclose(img.get_qform(), aff, atol=1e-3), (name, img.get_qform(), aff)
    codes.add("".join(nib.aff2axcodes(aff)))
assert len(codes) > 20, codes
print(len(intended), "affines,", len(codes), "orientations")
"#;

#[test]
fn nibabel_rebuilds_every_kind_of_random_affine_from_the_qform() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: run scripts/setup.sh to create the Python environment the tests need"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut intended = serde_json::Map::new();
    for i in 0..150 {
        let grid = random_grid(
            [0.0, -20.0, 0.0],
            &mut subject_rng(2, "qform", i, "scanner"),
        );
        let name = format!("g{i:03}.nii");
        write_nifti(
            &tmp.path().join(&name),
            [2, 2, 2],
            &[0.0; 8],
            &grid.affine,
            Encoding::Float32,
        )
        .expect("write");
        intended.insert(name, serde_json::json!(grid.affine));
    }
    let spec = tmp.path().join("intended.json");
    std::fs::write(&spec, serde_json::Value::Object(intended).to_string()).expect("write json");
    let run = Command::new(PYTHON)
        .args(["-c", QFORM_CHECK])
        .arg(tmp.path())
        .arg(&spec)
        .output()
        .expect("python runs");
    assert!(
        run.status.success(),
        "qform check failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
