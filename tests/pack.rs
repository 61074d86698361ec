//! `pack` orchestration and bad input: manifest validation, output checks before any work,
//! ordered parallel writes, --skip-bad, atomic output. Preprocessing is replaced by a synthetic
//! one (see `fake_prepare`) except in the tests marked `needs prepare_subject`.
mod common;

use clap::Parser;
use common::*;
use mtx_hpc::cli::{Cli, Command, PackArgs};
use mtx_hpc::data::corpus::Corpus;
use mtx_hpc::data::manifest::SubjectInput;
use mtx_hpc::data::pack::pack;
use mtx_hpc::data::preprocess::Prepared;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

const GRID: [usize; 3] = [5, 6, 7];

fn args(extra: &[&str]) -> PackArgs {
    let mut argv = vec!["mtx-hpc", "pack", "--grid", "5,6,7"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("command line").command {
        Command::Pack(a) => a,
        other => panic!("not pack: {other:?}"),
    }
}

/// Stands in for preprocessing: the "image" is a text file; "bad" fails, "panic" panics,
/// "warn" adds a warning, otherwise subject number k from the text gives `prepared(k)`.
fn fake_prepare(s: &SubjectInput) -> anyhow::Result<Prepared> {
    let text = std::fs::read_to_string(&s.image)?;
    if text.contains("bad") {
        anyhow::bail!("{}: not a NIfTI-1 file (bad magic)", s.image.display());
    }
    if text.contains("panic") {
        panic!("synthetic panic");
    }
    let k: usize = text
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    // Later subjects finish first: the writer must restore the input order.
    std::thread::sleep(std::time::Duration::from_millis(((7 - k % 7) * 3) as u64));
    let mut p = prepared(k, GRID, s.segmentation.is_some());
    if text.contains("warn") {
        p.warnings.push("foreground cropped by 3 voxels".into());
    }
    Ok(p)
}

/// A folder with a manifest over text "images"; `rows` are (id, session, content).
fn cohort(dir: &Path, rows: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut csv = String::from("subject_id,session,image,age,sex,diagnosis,site,segmentation\n");
    for (id, ses, content) in rows {
        let image = format!("{id}{ses}.nii.gz");
        std::fs::write(dir.join(&image), content).expect("write image");
        let seg = if content.contains("seg") {
            let seg = format!("{id}{ses}_seg.nii.gz");
            std::fs::write(dir.join(&seg), "labels").expect("write seg");
            seg
        } else {
            String::new()
        };
        csv += &format!("{id},{ses},{image},61.5,f,ad,siteA,{seg}\n");
    }
    let path = dir.join("manifest.csv");
    std::fs::write(&path, csv).expect("write manifest");
    path
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn err_of(r: anyhow::Result<mtx_hpc::data::pack::PackReport>) -> String {
    format!("{:#}", r.expect_err("pack must fail"))
}

#[test]
fn manifest_bad_input_each_gets_a_clear_error_and_no_output() {
    let header = "subject_id,image,age,sex,diagnosis\n";
    let cases: &[(&str, &str, &[&str])] = &[
        ("empty", "", &["manifest is empty"]),
        ("blank", "\n  \n", &["manifest is empty"]),
        ("header only", header, &["lists no subjects"]),
        (
            "no image column",
            "subject_id,age\nS1,3\n",
            &["bad header", "required column(s) image missing"],
        ),
        (
            "unknown column",
            "subject_id,image,weight\nS1,a.nii.gz,70\n",
            &["unknown column(s) 'weight'"],
        ),
        (
            "column twice",
            "subject_id,image,age,age\nS1,a.nii.gz,1,2\n",
            &["column 'age' appears twice"],
        ),
        (
            "duplicate",
            "subject_id,image\nS1,a.nii.gz\nS2,a.nii.gz\nS1,a.nii.gz\n",
            &["line 4", "duplicate subject S1", "first on line 2"],
        ),
        (
            "duplicate session",
            "subject_id,session,image\nS1,x,a.nii.gz\nS1,x,a.nii.gz\n",
            &["duplicate subject S1, session x"],
        ),
        (
            "age",
            "subject_id,image,age\nS1,a.nii.gz,old\n",
            &["line 2", "age 'old' of subject S1"],
        ),
        (
            "negative age",
            "subject_id,image,age\nS1,a.nii.gz,-4\n",
            &["age '-4'"],
        ),
        (
            "diagnosis",
            "subject_id,image,diagnosis\nS1,a.nii.gz,PD\n",
            &["diagnosis 'PD'", "CN, MCI, AD"],
        ),
        (
            "sex",
            "subject_id,image,sex\nS1,a.nii.gz,X\n",
            &["sex 'X'", "M, F"],
        ),
        (
            "empty id",
            "subject_id,image\n,a.nii.gz\n",
            &["subject_id is empty"],
        ),
        (
            "empty image",
            "subject_id,image\nS1,\n",
            &["image is empty for subject S1"],
        ),
        (
            "ragged",
            "subject_id,image\nS1,a.nii.gz,extra\n",
            &["malformed CSV"],
        ),
        (
            "image missing",
            "subject_id,image\nS1,a.nii.gz\nS2,gone.nii.gz\n",
            &[
                "subject S2: image",
                "gone.nii.gz not found",
                "line 3",
                "--skip-bad",
            ],
        ),
    ];
    let calls = AtomicUsize::new(0);
    for (name, content, wants) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.nii.gz"), "0").expect("image");
        let manifest = dir.path().join("manifest.csv");
        std::fs::write(&manifest, content).expect("manifest");
        let out = dir.path().join("out.h5");
        let a = args(&[
            "--manifest",
            manifest.to_str().expect("utf8"),
            "--out",
            out.to_str().expect("utf8"),
        ]);
        let err = err_of(pack(&a, |s| {
            calls.fetch_add(1, Ordering::Relaxed);
            fake_prepare(s)
        }));
        assert!(
            err.contains("manifest.csv"),
            "{name}: error does not name the file: {err}"
        );
        for want in *wants {
            assert!(err.contains(want), "{name}: expected '{want}' in: {err}");
        }
        assert_eq!(
            files_in(dir.path()),
            vec!["a.nii.gz", "manifest.csv"],
            "{name}: output left behind"
        );
    }
    assert_eq!(
        calls.load(Ordering::Relaxed),
        0,
        "bad manifests must fail before any preprocessing"
    );
    let err = err_of(pack(
        &args(&["--manifest", "/no/such/manifest.csv", "--out", "/tmp/x.h5"]),
        fake_prepare,
    ));
    assert!(
        err.contains("/no/such/manifest.csv") && err.contains("cannot read the manifest"),
        "{err}"
    );
}

#[test]
fn output_checks_happen_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = cohort(dir.path(), &[("S1", "", "1")]);
    let m = manifest.to_str().expect("utf8");
    let calls = AtomicUsize::new(0);
    let counting = |s: &SubjectInput| {
        calls.fetch_add(1, Ordering::Relaxed);
        fake_prepare(s)
    };
    let missing = dir.path().join("nowhere/out.h5");
    let err = err_of(pack(
        &args(&["--manifest", m, "--out", missing.to_str().expect("utf8")]),
        counting,
    ));
    assert!(
        err.contains("output folder") && err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );

    let existing = dir.path().join("old.h5");
    std::fs::write(&existing, "keep me").expect("write");
    let e = existing.to_str().expect("utf8");
    let err = err_of(pack(&args(&["--manifest", m, "--out", e]), counting));
    assert!(
        err.contains("old.h5") && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&existing).expect("read"), "keep me");
    assert_eq!(calls.load(Ordering::Relaxed), 0);

    let report = pack(&args(&["--manifest", m, "--out", e, "--force"]), counting)
        .expect("--force overwrites");
    assert_eq!(report.written, 1);
    assert_eq!(Corpus::open(&existing).expect("open").len(), 1);

    for (flag, value, want) in [
        ("--val-fraction", "1.5", "--val-fraction"),
        ("--spacing", "0", "--spacing"),
        ("--threads", "0", "--threads"),
    ] {
        let err = err_of(pack(
            &args(&["--manifest", m, "--out", e, "--force", flag, value]),
            counting,
        ));
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn missing_output_folder_through_the_binary_exits_non_zero_with_one_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = cohort(dir.path(), &[("S1", "", "1")]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .args(["pack", "--manifest"])
        .arg(&manifest)
        .arg("--out")
        .arg(dir.path().join("nowhere/c.h5"))
        .output()
        .expect("run mtx-hpc");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn parallel_pack_writes_subjects_in_manifest_order_with_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<(String, &str, String)> = (0..9)
        .map(|k| {
            let ses = if k == 4 { "b" } else { "a" };
            let id = if k == 4 {
                "S003".to_string()
            } else {
                format!("S{k:03}")
            };
            let extra = match k {
                2 => " warn",
                3 | 5 => " seg",
                _ => "",
            };
            (id, ses, format!("{k}{extra}"))
        })
        .collect();
    let rows_ref: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|(a, b, c)| (a.as_str(), *b, c.as_str()))
        .collect();
    let manifest = cohort(dir.path(), &rows_ref);
    let out = dir.path().join("c.h5");
    let a = args(&[
        "--manifest",
        manifest.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--threads",
        "3",
        "--val-fraction",
        "0.3",
    ]);
    let report = pack(&a, fake_prepare).expect("pack");
    assert_eq!(report.written, 9);
    assert!(report.skipped.is_empty());
    assert_eq!(
        report.warnings,
        vec![(
            "S002 (session a)".to_string(),
            "foreground cropped by 3 voxels".to_string()
        )]
    );
    assert_eq!(report.affine_sources.get("sform"), Some(&5));
    assert_eq!(report.affine_sources.get("qform"), Some(&4));
    let summary = report.to_string();
    assert!(
        summary.contains("wrote 9 subject(s)")
            && summary.contains("affine source: qform: 4, sform: 5"),
        "{summary}"
    );

    let c = Corpus::open(&out).expect("open");
    let (mut raw, mut vol) = (Vec::new(), Vec::new());
    for (k, (id, ses, _)) in rows.iter().enumerate() {
        let s = &c.subjects()[k];
        assert_eq!((&s.meta.id, s.meta.session.as_str()), (id, *ses));
        assert_eq!(s.meta.age, Some(61.5));
        assert_eq!(
            (
                s.meta.sex.as_str(),
                s.meta.diagnosis.as_str(),
                s.meta.site.as_str()
            ),
            ("F", "AD", "siteA")
        );
        assert_eq!(s.meta.source_file, format!("{id}{ses}.nii.gz"));
        let sum =
            mtx_hpc::io::file_checksum(&dir.path().join(&s.meta.source_file)).expect("checksum");
        assert_eq!(s.meta.source_checksum, sum);
        assert_eq!(s.has_segmentation, k == 3 || k == 5);
        c.read_volume(k, &mut raw, &mut vol).expect("read");
        let want = prepared(k, GRID, false).volume;
        assert!(
            vol.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-3),
            "subject {k} out of order"
        );
    }
    // Sessions of S003 stay on one side of the split.
    assert_eq!(c.subjects()[3].split, c.subjects()[4].split);
    assert_eq!(c.val_indices().len() + c.train_indices().len(), 9);
    assert!(!c.info().creation_command.is_empty());
}

#[test]
fn a_failing_subject_aborts_and_leaves_nothing_unless_skip_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = cohort(
        dir.path(),
        &[
            ("S0", "", "0"),
            ("S1", "", "1"),
            ("S2", "", "bad"),
            ("S3", "", "3"),
        ],
    );
    let m = manifest.to_str().expect("utf8");
    let out = dir.path().join("c.h5");
    let o = out.to_str().expect("utf8");
    let before = files_in(dir.path());
    let err = err_of(pack(
        &args(&["--manifest", m, "--out", o, "--threads", "2"]),
        fake_prepare,
    ));
    assert!(
        err.contains("subject S2") && err.contains("S2.nii.gz") && err.contains("bad magic"),
        "{err}"
    );
    assert!(err.contains("--skip-bad"), "{err}");
    assert_eq!(files_in(dir.path()), before, "a failed pack left files");

    std::fs::write(&out, "old corpus").expect("write");
    let err = err_of(pack(
        &args(&["--manifest", m, "--out", o, "--force"]),
        fake_prepare,
    ));
    assert!(err.contains("subject S2"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).expect("read"),
        "old corpus",
        "--force must not destroy on failure"
    );
    std::fs::remove_file(&out).expect("rm");

    std::fs::remove_file(dir.path().join("S1.nii.gz")).expect("rm");
    let report = pack(
        &args(&["--manifest", m, "--out", o, "--skip-bad"]),
        fake_prepare,
    )
    .expect("skip-bad pack");
    assert_eq!(report.written, 2);
    let skipped: Vec<&str> = report.skipped.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(skipped, vec!["S1", "S2"]);
    assert!(report.skipped[0].1.contains("not found") && report.skipped[1].1.contains("bad magic"));
    let text = report.to_string();
    assert!(
        text.contains("skipped 2") && text.contains("skipped S2:"),
        "{text}"
    );
    let c = Corpus::open(&out).expect("open");
    let ids: Vec<&str> = c.subjects().iter().map(|s| s.meta.id.as_str()).collect();
    assert_eq!(ids, vec!["S0", "S3"]);
}

#[test]
fn all_bad_with_skip_bad_is_an_error_and_a_panic_is_a_subject_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = cohort(dir.path(), &[("S0", "", "bad"), ("S1", "", "panic")]);
    let m = manifest.to_str().expect("utf8");
    let out = dir.path().join("c.h5");
    let o = out.to_str().expect("utf8");
    let before = files_in(dir.path());
    let err = err_of(pack(
        &args(&["--manifest", m, "--out", o, "--skip-bad"]),
        fake_prepare,
    ));
    assert!(
        err.contains("every subject failed") && err.contains("S0") && err.contains("panicked"),
        "{err}"
    );
    assert_eq!(files_in(dir.path()), before);
}

#[test]
fn pack_dir_takes_every_nifti_and_pairs_segmentations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = dir.path().join("scans");
    std::fs::create_dir(&inputs).expect("mkdir");
    for (name, content) in [
        ("b.nii", "1"),
        ("a.nii.gz", "0"),
        ("a_seg.nii.gz", "x"),
        ("notes.txt", "x"),
    ] {
        std::fs::write(inputs.join(name), content).expect("write");
    }
    let subjects = mtx_hpc::data::manifest::scan_dir(&inputs).expect("scan");
    let ids: Vec<&str> = subjects.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    assert_eq!(
        subjects[0].segmentation.as_deref(),
        Some(inputs.join("a_seg.nii.gz").as_path())
    );
    assert_eq!(subjects[1].segmentation, None);
    let out = dir.path().join("c.h5");
    let a = args(&[
        "--dir",
        inputs.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(pack(&a, fake_prepare).expect("pack").written, 2);
    let c = Corpus::open(&out).expect("open");
    assert!(c.subjects()[0].has_segmentation && !c.subjects()[1].has_segmentation);
    assert_eq!(c.subjects()[1].meta.source_file, "b.nii");

    std::fs::write(inputs.join("c_seg.nii.gz"), "x").expect("write");
    let err = format!(
        "{:#}",
        mtx_hpc::data::manifest::scan_dir(&inputs).expect_err("orphan")
    );
    assert!(
        err.contains("c_seg.nii.gz") && err.contains("no image c"),
        "{err}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let err = format!(
        "{:#}",
        mtx_hpc::data::manifest::scan_dir(&empty).expect_err("empty")
    );
    assert!(err.contains("no .nii or .nii.gz images"), "{err}");
}

#[test]
fn packing_the_same_inputs_twice_gives_the_same_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<String> = (0..6)
        .map(|k| format!("{k}{}", if k == 2 { " seg" } else { "" }))
        .collect();
    let ids: Vec<String> = (0..6).map(|k| format!("S{k}")).collect();
    let table: Vec<(&str, &str, &str)> = ids
        .iter()
        .zip(&rows)
        .map(|(i, r)| (i.as_str(), "", r.as_str()))
        .collect();
    let manifest = cohort(dir.path(), &table);
    let out = dir.path().join("c.h5");
    let a = args(&[
        "--manifest",
        manifest.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--threads",
        "3",
        "--force",
    ]);
    pack(&a, fake_prepare).expect("first");
    let first = std::fs::read(&out).expect("read");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    pack(&a, fake_prepare).expect("second");
    assert!(
        first == std::fs::read(&out).expect("read"),
        "same inputs, different bytes"
    );
}
