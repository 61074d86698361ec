//! `mtx-hpc finetune`, `predict` and `embed` through the binary at the tiny preset: the files
//! a run writes and what they hold, bad input refused before anything is written, and
//! `predict` on a new NIfTI giving the answer the evaluation gave for that subject.
mod common;

use common::{mtx, synth_and_pack_tiny};
use mtx_hpc::data::corpus::{CorpusWriter, SubjectMeta};
use mtx_hpc::downstream::report::MetricsFile;
use mtx_hpc::io::AtomicFile;
use mtx_hpc::model::{Layout, ModelConfig, Preset};
use mtx_hpc::train::Checkpoint;
use std::path::{Path, PathBuf};

const TINY: [usize; 3] = [32, 38, 32];

fn ok(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mtx-hpc failed:\n{text}");
    text
}

fn err(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "mtx-hpc should have failed:\n{text}");
    text
}

/// 16 in-process subjects at the tiny grid (6 mm): diagnosis CN/AD on half of them (MCI and
/// unknown on the rest), ages on all but one; tumour labels on the odd ones when `labels`.
fn corpus(dir: &Path, name: &str, labels: bool) -> PathBuf {
    let path = dir.join(name);
    let mut header = common::header(TINY);
    header.params.spacing = 6.0;
    let out = AtomicFile::new(&path, true).unwrap();
    let mut w = CorpusWriter::create(out, &path, header, 16).unwrap();
    for k in 0..16 {
        let meta = SubjectMeta {
            session: String::new(),
            ..common::meta(k)
        };
        w.push(meta, &common::prepared(k, TINY, labels && k % 2 == 1))
            .unwrap();
    }
    w.finish().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_run_writes_metrics_predictions_and_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path(), "c.h5", false);
    let ck = common::pretraining_checkpoint(tmp.path(), Preset::Tiny);
    let out = tmp.path().join("diag");
    let text = ok(&mtx(&[
        "finetune",
        "--task",
        "diagnosis",
        "--corpus",
        s(&c),
        "--checkpoint",
        s(&ck),
        "--out",
        s(&out),
        "--folds",
        "2",
        "--fold",
        "1",
        "--epochs",
        "2",
        "--freeze-encoder",
        "--device",
        "cpu",
    ]));
    // 8 subjects have CN or AD; the MCI and unknown ones are left out and counted.
    assert!(text.contains("8 labelled subjects in 2 folds"), "{text}");
    assert!(text.contains("left out 8 subjects"), "{text}");
    let m = MetricsFile::read(&out.join("metrics.json")).unwrap();
    assert_eq!((m.fold, m.folds, m.seed), (1, 2, 0));
    assert_eq!(m.fraction, 1.0);
    assert_eq!(m.init.name(), "pretrained");
    assert_eq!(
        m.checkpoint_checksum.as_deref(),
        Some(mtx_hpc::io::file_checksum(&ck).unwrap().as_str())
    );
    assert!(m.params_trained < m.params_total, "the encoder was frozen");
    let layout = Layout::new(&ModelConfig::preset(Preset::Tiny));
    assert_eq!(
        m.params_total - m.params_trained,
        layout.param_count(mtx_hpc::model::Part::Encoder) as u64
    );
    for name in [
        "auc",
        "auc_ci95_low",
        "auc_ci95_high",
        "accuracy",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "threshold",
        "accuracy_at_0.5",
    ] {
        assert!(m.results.get(name).is_some(), "{name} missing");
    }
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "subject_id,session,diagnosis,probability,predicted"
    );
    assert_eq!(rows.len(), 1 + 4, "the 4 test subjects of fold 1:\n{csv}");
    let ft = Checkpoint::read(&out.join("finetuned.h5")).unwrap();
    assert!(
        ft.downstream
            .as_deref()
            .unwrap()
            .contains("\"task\":\"diagnosis\"")
    );
    // A finished run is not overwritten without --force.
    let e = err(&mtx(&[
        "finetune",
        "--task",
        "diagnosis",
        "--corpus",
        s(&c),
        "--scratch",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("--force"), "{e}");
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path(), "c.h5", false);
    let ck = common::pretraining_checkpoint(tmp.path(), Preset::Tiny);
    let small = common::pretraining_checkpoint(tmp.path(), Preset::Small);
    let grid = tmp.path().join("grid.txt");
    std::fs::write(&grid, "age 0 1 scratch 0\n").unwrap();
    let out = tmp.path().join("out");
    let base = |extra: &[&str]| {
        let mut a = vec![
            "finetune",
            "--corpus",
            s(&c),
            "--out",
            s(&out),
            "--epochs",
            "1",
        ];
        a.extend_from_slice(extra);
        mtx(&a)
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--task", "age", "--checkpoint", s(&small)],
            "too small for preset small",
        ),
        (
            vec!["--task", "segmentation", "--scratch"],
            "no segmentations",
        ),
        (
            vec!["--task", "age", "--scratch", "--fold", "5"],
            "fold 5 is out of range",
        ),
        (
            vec!["--task", "age", "--scratch", "--label-fraction", "1.5"],
            "outside (0, 1]",
        ),
        (
            vec!["--task", "age", "--scratch", "--label-fraction", "0"],
            "outside (0, 1]",
        ),
        (
            vec!["--task", "diagnosis", "--scratch", "--classes", "CN,XX"],
            "no subject has diagnosis 'XX'",
        ),
        (vec!["--task", "age"], "--checkpoint"),
        (
            vec!["--grid-file", s(&grid), "--cell", "3"],
            "cell 3 is out of range",
        ),
    ];
    for (args, want) in cases {
        let e = err(&base(&args));
        assert!(e.contains(want), "{args:?}: expected '{want}' in:\n{e}");
        assert!(
            !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
            "{args:?} left files in {}",
            out.display()
        );
    }
    // A fine-tuned checkpoint is not a pretraining one.
    let ft = tmp.path().join("ft");
    ok(&mtx(&[
        "finetune",
        "--task",
        "age",
        "--corpus",
        s(&c),
        "--checkpoint",
        s(&ck),
        "--out",
        s(&ft),
        "--folds",
        "2",
        "--epochs",
        "1",
    ]));
    let e = err(&base(&[
        "--task",
        "age",
        "--checkpoint",
        s(&ft.join("finetuned.h5")),
    ]));
    assert!(
        e.contains("a fine-tuned checkpoint, not a pretraining one"),
        "{e}"
    );
    // ...and a pretraining checkpoint is not a fine-tuned one.
    let e = err(&mtx(&[
        "predict",
        "--checkpoint",
        s(&ck),
        "--input",
        "x.nii.gz",
        "--out",
        s(&out),
    ]));
    assert!(e.contains("not a fine-tuned one"), "{e}");
}

#[test]
fn embed_writes_vectors_of_every_subject() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path(), "c.h5", false);
    let ck = common::pretraining_checkpoint(tmp.path(), Preset::Tiny);
    let e = tmp.path().join("e.h5");
    ok(&mtx(&[
        "embed",
        "--checkpoint",
        s(&ck),
        "--corpus",
        s(&c),
        "--out",
        s(&e),
        "--batch",
        "5",
    ]));
    let f = hdf5::File::open(&e).unwrap();
    let d = ModelConfig::preset(Preset::Tiny).d;
    assert_eq!(f.dataset("axial").unwrap().shape(), [16, TINY[2], d]);
    assert_eq!(f.dataset("sagittal").unwrap().shape(), [16, TINY[0], d]);
    assert_eq!(f.dataset("coronal").unwrap().shape(), [16, TINY[1], d]);
    let pooled: ndarray::Array2<f32> = f.dataset("pooled").unwrap().read_2d().unwrap();
    assert_eq!(pooled.shape(), [16, 3 * d]);
    assert!(pooled.iter().all(|v| v.is_finite()));
    // Subjects differ, so their pooled vectors do.
    assert_ne!(pooled.row(0), pooled.row(1));
    let ids: Vec<hdf5::types::VarLenUnicode> =
        f.dataset("subjects/id").unwrap().read_raw().unwrap();
    assert_eq!(ids[3].as_str(), "S003");
}

/// The real path: synth a few clinical subjects, pack them at the tiny grid, fine-tune for
/// age, then `predict` the test subjects' source NIfTI files: the same ages as the
/// evaluation wrote (the volumes are bit-identical, the batch differs).
#[test]
fn predict_on_a_new_scan_matches_the_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let synth = tmp.path().join("synth");
    let c = tmp.path().join("c.h5");
    synth_and_pack_tiny(
        &synth,
        &c,
        &["--cohort", "clinical", "--subjects", "8", "--seed", "5"],
        &[],
    );
    let out = tmp.path().join("age");
    ok(&mtx(&[
        "finetune",
        "--task",
        "age",
        "--corpus",
        s(&c),
        "--scratch",
        "--out",
        s(&out),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--batch",
        "3",
    ]));
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 4);
    let pred = tmp.path().join("pred");
    let (id, age, want) = (&rows[1][0], &rows[1][2], rows[1][3].parse::<f64>().unwrap());
    let image = synth.join(format!("{id}.nii.gz"));
    ok(&mtx(&[
        "predict",
        "--checkpoint",
        s(&out),
        "--input",
        s(&image),
        "--age",
        age,
        "--out",
        s(&pred),
    ]));
    let got = std::fs::read_to_string(pred.join("predictions.csv")).unwrap();
    let line: Vec<&str> = got.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(line[0], id.as_str());
    let age_pred: f64 = line[3].parse().unwrap();
    assert!(
        (age_pred - want).abs() < 1e-3,
        "predict says {age_pred}, the evaluation said {want}"
    );
    let gap: f64 = line[5].parse().unwrap();
    assert!((gap - (age_pred - age.parse::<f64>().unwrap())).abs() < 1e-3);
}

/// `bench step` times a fine-tuning step of each task (any batch size, no corpus needed).
#[test]
fn bench_step_times_fine_tuning_steps() {
    for task in ["diagnosis", "age", "segmentation"] {
        let text = ok(&mtx(&[
            "bench", "step", "--preset", "tiny", "--batch", "1", "--stage", task, "--steps", "1",
            "--device", "cpu",
        ]));
        assert!(text.contains(&format!("fine-tuning {task}")), "{text}");
        assert!(text.contains("median step"), "{text}");
    }
}

/// Segmentation: metrics per region, and each test subject's mask written on its source
/// grid with its source affine (read back with nibabel).
#[test]
fn segmentation_writes_masks_on_the_source_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let c = corpus(tmp.path(), "c.h5", true);
    let out = tmp.path().join("seg");
    ok(&mtx(&[
        "finetune",
        "--task",
        "segmentation",
        "--corpus",
        s(&c),
        "--scratch",
        "--out",
        s(&out),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]));
    let m = MetricsFile::read(&out.join("metrics.json")).unwrap();
    for name in [
        "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et",
    ] {
        assert!(m.results.get(name).is_some(), "{name} missing");
    }
    let corpus = mtx_hpc::data::corpus::Corpus::open(&c).unwrap();
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let ids: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "the 4 tumour subjects of fold 0:\n{csv}");
    let script = "import sys, json, nibabel as nib, numpy as np\n\
        for p in sys.argv[1:]:\n    \
            img = nib.load(p)\n    \
            d = np.asanyarray(img.dataobj)\n    \
            print(json.dumps({'shape': list(img.shape), 'affine': img.affine.tolist(), \
            'dtype': str(d.dtype), 'codes': sorted(set(np.unique(d).tolist()))}))\n";
    let paths: Vec<String> = ids
        .iter()
        .map(|id| {
            out.join("masks")
                .join(format!("{id}_seg.nii.gz"))
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec!["-c", script];
    args.extend(paths.iter().map(String::as_str));
    let printed = common::run_python(&args);
    for (id, line) in ids.iter().zip(printed.lines()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let g = &corpus.subjects()[corpus.find(id, None).unwrap()].geometry;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, g.source_shape.to_vec(), "{id}");
        for r in 0..4 {
            for k in 0..4 {
                let a = v["affine"][r][k].as_f64().unwrap();
                assert!(
                    (a - g.source_affine[r][k]).abs() < 1e-4,
                    "{id} affine[{r}][{k}]: {a}"
                );
            }
        }
        assert_eq!(v["dtype"], "uint8", "{id}");
        for code in v["codes"].as_array().unwrap() {
            assert!(
                [0, 1, 2, 4].contains(&code.as_u64().unwrap()),
                "{id}: code {code}"
            );
        }
    }
}
