//! End-to-end `pack` on real NIfTI files written by nibabel, through the binary.
mod common;

use common::python;
use mtx_hpc::data::corpus::Corpus;
use std::path::Path;
use std::process::{Command, Output};

/// Writes three 40x48x40 1.5 mm T1-like images (one LPS, one with a BraTS segmentation), a
/// truncated .nii.gz and a text file named .nii.gz, plus `manifest.csv` for the good three.
fn nifti_cohort(dir: &Path) {
    let script = r#"
import sys, os, gzip, numpy as np, nibabel as nib
d = sys.argv[1]
rng = np.random.default_rng(0)
shape = (40, 48, 40)
x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
brain = ((x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.7) ** 2) < 1
rows = []
for k, codes in enumerate(["RAS", "LPS", "RAS"]):
    img = (brain * (100 + 20 * k) + rng.normal(0, 2, shape)).astype(np.float32)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    if codes == "LPS":
        aff[0, 0] = aff[1, 1] = -1.5
    aff[:3, 3] = -aff[:3, :3] @ (np.array(shape) / 2)
    nib.save(nib.Nifti1Image(img, aff), os.path.join(d, f"s{k}.nii.gz"))
    seg = ""
    if k == 2:
        lab = np.zeros(shape, np.uint8)
        lab[18:22, 22:26, 18:22] = 2
        lab[19:21, 23:25, 19:21] = 1
        nib.save(nib.Nifti1Image(lab, aff), os.path.join(d, "s2_seg.nii.gz"))
        seg = "s2_seg.nii.gz"
    rows.append(f"s{k},s{k}.nii.gz,{30 + k},M,CN,a,{seg}")
with open(os.path.join(d, "manifest.csv"), "w") as f:
    f.write("subject_id,image,age,sex,diagnosis,site,segmentation\n" + "\n".join(rows) + "\n")
whole = open(os.path.join(d, "s0.nii.gz"), "rb").read()
open(os.path.join(d, "trunc.nii.gz"), "wb").write(whole[: len(whole) // 2])
open(os.path.join(d, "text.nii.gz"), "w").write("not a nifti\n")
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "nibabel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mtx(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .args(args)
        .output()
        .expect("run mtx-hpc")
}

fn ok(o: &Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "failed:\n{so}\n{se}");
    format!("{so}{se}")
}

#[test]
fn pack_nibabel_files_then_inspect_with_png() {
    let dir = tempfile::tempdir().expect("tempdir");
    nifti_cohort(dir.path());
    let out = dir.path().join("c.h5");
    let log = ok(&mtx(&[
        "pack".as_ref(),
        "--manifest".as_ref(),
        dir.path().join("manifest.csv").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--grid".as_ref(),
        "40,48,40".as_ref(),
        "--threads".as_ref(),
        "2".as_ref(),
    ]));
    assert!(
        log.contains("wrote 3 subject(s)") && log.contains("sform: 3"),
        "{log}"
    );
    let c = Corpus::open(&out).expect("open");
    assert_eq!(c.len(), 3);
    assert_eq!(c.grid(), [40, 48, 40]);
    assert!(c.has_labels() && c.subjects()[2].has_segmentation);
    let mut labels = Vec::new();
    assert!(c.read_labels(2, &mut labels).expect("labels"));
    assert!(labels.contains(&1) && labels.contains(&2));
    let (mut raw, mut vol) = (Vec::new(), Vec::new());
    c.read_volume(1, &mut raw, &mut vol).expect("read");
    let max = vol.iter().copied().fold(f32::MIN, f32::max);
    assert!(
        (0.9..=1.001).contains(&max),
        "min-max normalised volume peaks at {max}"
    );
    let png = dir.path().join("s2.png");
    let log = ok(&mtx(&[
        "inspect".as_ref(),
        out.as_os_str(),
        "--subject".as_ref(),
        "s2".as_ref(),
        "--png".as_ref(),
        png.as_os_str(),
    ]));
    assert!(log.contains("neurological") && png.is_file(), "{log}");
}

#[test]
fn bad_nifti_aborts_without_output_unless_skip_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    nifti_cohort(dir.path());
    let scans = dir.path();
    let out = dir.path().join("out").join("c.h5");
    std::fs::create_dir(dir.path().join("out")).expect("mkdir");
    let base = |extra: &[&str]| {
        let mut v: Vec<std::ffi::OsString> = vec![
            "pack".into(),
            "--dir".into(),
            scans.into(),
            "--out".into(),
            out.clone().into(),
        ];
        v.extend(["--grid", "40,48,40"].iter().map(Into::into));
        v.extend(extra.iter().map(Into::into));
        v
    };
    let argv = base(&[]);
    let o = mtx(&argv.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("subject t") && stderr.contains(".nii.gz"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(dir.path().join("out"))
            .expect("ls")
            .next()
            .is_none(),
        "output left behind"
    );

    let argv = base(&["--skip-bad"]);
    let log = ok(&mtx(&argv
        .iter()
        .map(|s| s.as_os_str())
        .collect::<Vec<_>>()));
    assert!(
        log.contains("skipped 2")
            && log.contains("skipped text:")
            && log.contains("skipped trunc:"),
        "{log}"
    );
    let c = Corpus::open(&out).expect("open");
    let ids: Vec<&str> = c.subjects().iter().map(|s| s.meta.id.as_str()).collect();
    assert_eq!(ids, vec!["s0", "s1", "s2"]);
}
