//! Checkpoints: bit-exact round trip, clear refusals (other version, other preset or layout,
//! truncated or foreign files), the run-folder policy (latest complete, pruning), h5py reading
//! a tensor by its layout name, and `inspect` on a checkpoint.
mod common;

use mtx_hpc::model::init::init_params;
use mtx_hpc::model::{Layout, ModelConfig, Part, Preset};
use mtx_hpc::train::checkpoint::{
    BEST, FINAL, FORMAT_VERSION, latest_complete, param_checksum, prune, step_file_name,
};
use mtx_hpc::train::{Checkpoint, CheckpointMeta, RunConfig, Stage};
use std::path::{Path, PathBuf};

fn meta(model: &ModelConfig, step: u64) -> CheckpointMeta {
    CheckpointMeta {
        stage: Stage::Mevp,
        step,
        epoch: 3,
        best_val_loss: Some(0.125),
        stale_epochs: 2,
        model: model.clone(),
        run: RunConfig {
            preset: model.preset,
            seed: 9,
            ..RunConfig::default()
        },
        corpus_checksum: "ab".repeat(32),
    }
}

/// Writes a tiny-preset checkpoint (moments included) with values that exercise every bit
/// pattern class; returns the buffers.
fn write_tiny(path: &Path, model: &ModelConfig, step: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let layout = Layout::new(model);
    let mut p = init_params(&layout, 3);
    let e = layout.get("encoder.fc.bias").unwrap();
    p[e.offset] = f32::MIN_POSITIVE / 4.0; // subnormal
    p[e.offset + 1] = -0.0;
    p[e.offset + 2] = f32::MAX;
    let m: Vec<f32> = p.iter().map(|v| v * 0.5).collect();
    let v: Vec<f32> = p.iter().map(|v| v * v).collect();
    Checkpoint::write(path, &layout, &p, Some(&m), Some(&v), &meta(model, step))
        .expect("write checkpoint");
    (p, m, v)
}

fn tiny() -> ModelConfig {
    ModelConfig::preset(Preset::Tiny)
}

fn err(r: anyhow::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    let model = tiny();
    let layout = Layout::new(&model);
    let (p, m, v) = write_tiny(&path, &model, 42);
    let c = Checkpoint::read(&path).unwrap();
    assert_eq!(c.meta, meta(&model, 42));
    assert_eq!(c.format_version, FORMAT_VERSION);
    assert_eq!(c.tool_version, mtx_hpc::TOOL_VERSION);
    assert_eq!(c.param_checksum, param_checksum(&layout, &p).unwrap());
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&c.read_params(&layout).unwrap()), bits(&p));
    let (m2, v2) = c.read_moments(&layout).unwrap().unwrap();
    assert_eq!(bits(&m2), bits(&m));
    assert_eq!(bits(&v2), bits(&v));
    assert_eq!(c.tensors().unwrap().len(), layout.entries().len());
    // No moments, no best loss: both come back as absent.
    let path2 = dir.path().join("p.h5");
    let mut m2 = meta(&model, 1);
    m2.best_val_loss = None;
    Checkpoint::write(&path2, &layout, &p, None, None, &m2).unwrap();
    let c2 = Checkpoint::read(&path2).unwrap();
    assert!(c2.read_moments(&layout).unwrap().is_none());
    assert_eq!(c2.meta.best_val_loss, None);
    // Identical contents give identical bytes (no timestamps in the file).
    Checkpoint::write(&path2, &layout, &p, None, None, &m2).unwrap();
    let again = dir.path().join("q.h5");
    Checkpoint::write(&again, &layout, &p, None, None, &m2).unwrap();
    assert_eq!(
        std::fs::read(&path2).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

#[test]
fn write_refuses_mismatched_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    let model = tiny();
    let layout = Layout::new(&model);
    let p = init_params(&layout, 0);
    let short = &p[..p.len() - 1];
    let e = err(Checkpoint::write(
        &path,
        &layout,
        short,
        None,
        None,
        &meta(&model, 0),
    ));
    assert!(e.contains("buffer holds"), "{e}");
    let e = err(Checkpoint::write(
        &path,
        &layout,
        &p,
        Some(&p),
        None,
        &meta(&model, 0),
    ));
    assert!(e.contains("both or neither"), "{e}");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn other_format_version_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    write_tiny(&path, &tiny(), 1);
    {
        let f = common::h5_open(&path, true);
        f.attr("format_version")
            .unwrap()
            .write_scalar(&2u32)
            .unwrap();
    }
    let e = err(Checkpoint::read(&path));
    assert!(
        e.contains("c.h5") && e.contains("version 2") && e.contains("reads version 1"),
        "{e}"
    );
}

#[test]
fn other_preset_or_layout_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.h5");
    write_tiny(&path, &tiny(), 1);
    let c = Checkpoint::read(&path).unwrap();
    let paper = Layout::new(&ModelConfig::preset(Preset::Paper));
    let e = err(c.read_params(&paper));
    assert!(
        e.contains("preset tiny") && e.contains("preset paper") && e.contains("tiny.h5"),
        "{e}"
    );
    // Same preset, other shapes: a checkpoint with two layers against a one-layer layout,
    // and the other way round, and one changed width.
    let mut two = tiny();
    two.layers = 2;
    let p2 = dir.path().join("two.h5");
    write_tiny(&p2, &two, 1);
    let e = err(Checkpoint::read(&p2)
        .unwrap()
        .read_params(&Layout::new(&tiny())));
    assert!(e.contains("transformer.l2.") && e.contains("not in"), "{e}");
    let e = err(c.read_params(&Layout::new(&two)));
    assert!(
        e.contains("'transformer.l2.") && e.contains("missing"),
        "{e}"
    );
    let mut wide = tiny();
    wide.ffn = 48;
    let e = err(c.read_params(&Layout::new(&wide)));
    assert!(
        e.contains("transformer.l1.ffn.fc2.weight") && e.contains("[32, 64]"),
        "{e}"
    );
}

#[test]
fn damaged_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    write_tiny(&path, &tiny(), 1);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.h5");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(Checkpoint::read(&cut).and_then(|c| c.read_params(&Layout::new(&tiny()))));
    assert!(e.contains("cut.h5"), "{e}");
    let junk = dir.path().join("junk.h5");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let e = err(Checkpoint::read(&junk));
    assert!(
        e.contains("junk.h5") && e.contains("not an HDF5 file"),
        "{e}"
    );
    let e = err(Checkpoint::read(&dir.path().join("none.h5")));
    assert!(e.contains("no such file"), "{e}");
    let corpus = common::write_corpus(&dir.path().join("corpus.h5"), [4, 5, 6], 2, false);
    let e = err(Checkpoint::read(&corpus));
    assert!(e.contains("mtx-hpc-corpus"), "{e}");
    // A flipped parameter value is caught by the checksum.
    {
        let f = common::h5_open(&path, true);
        let ds = f.dataset("params/encoder.stem.conv").unwrap();
        let mut v: Vec<f32> = ds.read_raw().unwrap();
        v[0] += 1.0;
        ds.write_raw(&v).unwrap();
    }
    let e = err(Checkpoint::read(&path)
        .unwrap()
        .read_params(&Layout::new(&tiny())));
    assert!(e.contains("damaged"), "{e}");
}

fn touch_step(dir: &Path, step: u64) -> PathBuf {
    let p = dir.join(step_file_name(step));
    std::fs::write(&p, b"").unwrap();
    p
}

#[test]
fn latest_complete_and_prune_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(latest_complete(d).unwrap(), None);
    assert_eq!(latest_complete(&d.join("not-yet")).unwrap(), None);
    for s in [100, 300, 200, 1000] {
        touch_step(d, s);
    }
    // Temporary files of an interrupted write and foreign names are ignored.
    std::fs::write(d.join(".ckpt-step00002000.h5.abc123.partial"), b"").unwrap();
    std::fs::write(d.join("ckpt-step2000.h5"), b"").unwrap();
    std::fs::write(d.join("notes.txt"), b"").unwrap();
    assert_eq!(
        latest_complete(d).unwrap(),
        Some(d.join(step_file_name(1000)))
    );
    let model = tiny();
    write_tiny(&d.join(BEST), &model, 300);
    assert_eq!(
        latest_complete(d).unwrap(),
        Some(d.join(step_file_name(1000)))
    );
    write_tiny(&d.join(FINAL), &model, 1000);
    assert_eq!(
        latest_complete(d).unwrap(),
        Some(d.join(step_file_name(1000)))
    );
    write_tiny(&d.join(FINAL), &model, 1005);
    assert_eq!(latest_complete(d).unwrap(), Some(d.join(FINAL)));

    let removed = prune(d, 2).unwrap();
    assert_eq!(
        removed,
        vec![d.join(step_file_name(100)), d.join(step_file_name(200))]
    );
    let mut left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            ".ckpt-step00002000.h5.abc123.partial",
            "best.h5",
            "ckpt-step00000300.h5",
            "ckpt-step00001000.h5",
            "ckpt-step2000.h5",
            "final.h5",
            "notes.txt"
        ]
    );
    assert!(prune(d, 5).unwrap().is_empty());
}

#[test]
fn h5py_reads_parameters_by_layout_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    let model = tiny();
    let layout = Layout::new(&model);
    let (p, _, _) = write_tiny(&path, &model, 7);
    let script = r#"
import sys, h5py, numpy as np, hashlib
f = h5py.File(sys.argv[1], "r")
w = f["params"]["encoder.stem.conv"]
print(f.attrs["format"], int(f.attrs["format_version"]), f.attrs["preset"], int(f.attrs["step"]))
print(w.dtype, w.shape, repr(float(w[0, 0, 3, 4])))
params = {name: np.asarray(ds) for name, ds in f["params"].items()}
print(len(params), sum(v.size for v in params.values()))
"#;
    let out = common::run_python(&["-c", script, path.to_str().unwrap()]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("mtx-hpc-checkpoint 1 tiny 7"));
    let w = layout.slice(&p, "encoder.stem.conv").unwrap();
    // Index [0, 0, 3, 4] of [8, 1, 7, 7], row-major.
    let want = f64::from(w[3 * 7 + 4]);
    let line = lines.next().unwrap();
    assert!(line.starts_with("float32 (8, 1, 7, 7) "), "{line}");
    let got: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(got, want);
    assert_eq!(
        lines.next(),
        Some(format!("{} {}", layout.entries().len(), layout.param_total()).as_str())
    );
}

#[test]
fn inspect_shows_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    let model = tiny();
    let layout = Layout::new(&model);
    write_tiny(&path, &model, 42);
    let out = common::mtx(&["inspect", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "mtx-hpc-checkpoint version 1".to_string(),
        format!("tool version:    {}", mtx_hpc::TOOL_VERSION),
        "stage mevp, step 42, epoch 3".into(),
        "best val loss:   0.125".into(),
        "preset:          tiny".into(),
        format!(
            "encoder {}, transformer {}",
            layout.param_count(Part::Encoder),
            layout.param_count(Part::Transformer)
        ),
        "encoder.stem.conv".into(),
        "[8, 1, 7, 7]".into(),
        "transformer.plane_embedding".into(),
        "joint_sequence = false".into(),
        "seed = 9".into(),
    ] {
        assert!(stdout.contains(&want), "missing '{want}' in:\n{stdout}");
    }
    let out = common::mtx(&["inspect", path.to_str().unwrap(), "--subject", "x"]);
    assert!(!out.status.success());
}

/// The Python snippet of docs/checkpoint-format.md (up to its example call) rebuilds the flat buffer
/// bit for bit, padding included.
#[test]
fn docs_snippet_rebuilds_the_flat_buffer() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/checkpoint-format.md"
    ))
    .expect("docs/checkpoint-format.md");
    let block = doc
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a python block in docs/checkpoint-format.md");
    let definitions = block
        .split("\nparams, flat = load_weights(")
        .next()
        .expect("the example call");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.h5");
    let raw = dir.path().join("flat.f32");
    let model = tiny();
    let layout = Layout::new(&model);
    let (p, _, _) = write_tiny(&path, &model, 7);
    let script = format!(
        "{definitions}\nimport sys\nparams, flat = load_weights(sys.argv[1])\n\
flat.astype('<f4').tofile(sys.argv[2])\nprint(len(params))\n"
    );
    let out = common::run_python(&["-c", &script, path.to_str().unwrap(), raw.to_str().unwrap()]);
    assert_eq!(out.trim(), layout.entries().len().to_string());
    let bytes = std::fs::read(&raw).unwrap();
    let want: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(bytes.len(), want.len());
    assert!(bytes == want, "the rebuilt buffer differs");
}
