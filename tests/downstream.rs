//! Downstream evaluation from the outside: the metrics against numpy/scipy on random inputs,
//! `mtx-hpc report` on a synthetic tree of runs (its page in docs/CLI.md: tests/cli_doc.rs).
mod common;

use mtx_hpc::downstream::metrics::{self, Grid3, MetricSet};
use mtx_hpc::downstream::report::{Cell, FAILED_FILE, METRICS_FILE, METRICS_FORMAT, MetricsFile};
use mtx_hpc::downstream::{Init, Task};
use std::path::Path;

/// scipy's view of the same quantities: AUC from the Mann-Whitney U, Pearson r, the linear
/// fit of predicted on age, and HD95 from exact distance transforms of the 6-connected
/// surfaces (voxels on the grid's border count as surface), pooled, 95th percentile.
const REFERENCE: &str = r#"
import json, sys
import numpy as np
from scipy import ndimage, stats
case = json.load(open(sys.argv[1]))
out = {}
y = np.array(case["labels"], bool); s = np.array(case["scores"])
out["auc"] = stats.mannwhitneyu(s[y], s[~y]).statistic / (y.sum() * (~y).sum())
t = np.array(case["truth"]); p = np.array(case["pred"])
out["pearson"] = stats.pearsonr(t, p).statistic
b, a = np.polyfit(t, p, 1)
out["bias_a"], out["bias_b"] = a, b
dims = case["dims"]; sp = case["spacing"]
ball = ndimage.generate_binary_structure(3, 1)
def surface(m):
    return m & ~ndimage.binary_erosion(m, structure=ball, border_value=0)
hd = []
for ma, mb in case["masks"]:
    A = np.array(ma, bool).reshape(dims); B = np.array(mb, bool).reshape(dims)
    sa, sb = surface(A), surface(B)
    da = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    db = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    hd.append(float(np.percentile(np.concatenate([da, db]), 95)))
out["hd95"] = hd
print(json.dumps(out))
"#;

#[test]
fn metrics_agree_with_numpy_and_scipy() {
    let mut rng = mtx_hpc::rng::keyed(11, &[], "scipy cross-check");
    let unit = |rng: &mut _| mtx_hpc::rng::unit(rng);
    let n = 60;
    let labels: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
    // Scores on a coarse grid so there are many ties; positives shifted up.
    let scores: Vec<f64> = labels
        .iter()
        .map(|&y| ((unit(&mut rng) * 8.0).floor() + if y { 2.0 } else { 0.0 }) / 10.0)
        .collect();
    let truth: Vec<f64> = (0..n).map(|_| 20.0 + 70.0 * unit(&mut rng)).collect();
    let pred: Vec<f64> = truth
        .iter()
        .map(|t| 35.0 + 0.5 * t + 8.0 * (unit(&mut rng) - 0.5))
        .collect();
    let grid = Grid3 {
        dims: [14, 11, 9],
        spacing: [1.5, 1.0, 2.5],
    };
    // Random blobs: unions of a few boxes, so the surfaces have corners and holes.
    let blob = |rng: &mut _| {
        let mut m = vec![false; grid.len()];
        for _ in 0..3 {
            let lo: Vec<usize> = (0..3)
                .map(|a| (unit(rng) * grid.dims[a] as f64 * 0.7) as usize)
                .collect();
            let size: Vec<usize> = (0..3).map(|_| 1 + (unit(rng) * 5.0) as usize).collect();
            for i in lo[0]..(lo[0] + size[0]).min(grid.dims[0]) {
                for j in lo[1]..(lo[1] + size[1]).min(grid.dims[1]) {
                    for k in lo[2]..(lo[2] + size[2]).min(grid.dims[2]) {
                        m[(i * grid.dims[1] + j) * grid.dims[2] + k] = true;
                    }
                }
            }
        }
        m
    };
    let masks: Vec<(Vec<bool>, Vec<bool>)> =
        (0..6).map(|_| (blob(&mut rng), blob(&mut rng))).collect();
    let case = serde_json::json!({
        "labels": labels, "scores": scores, "truth": truth, "pred": pred,
        "dims": grid.dims, "spacing": grid.spacing, "masks": masks,
    });
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("case.json");
    std::fs::write(&input, case.to_string()).unwrap();
    let out = common::run_python(&["-c", REFERENCE, input.to_str().unwrap()]);
    let want: serde_json::Value = serde_json::from_str(&out).unwrap();
    let near = |got: f64, key: &serde_json::Value, what: &str| {
        let w = key.as_f64().unwrap();
        assert!((got - w).abs() < 1e-9, "{what}: ours {got}, scipy {w}");
    };
    near(
        metrics::roc_auc(&labels, &scores).unwrap(),
        &want["auc"],
        "AUC",
    );
    near(
        metrics::pearson_r(&truth, &pred).unwrap(),
        &want["pearson"],
        "Pearson r",
    );
    let bias = metrics::AgeBias::fit(&truth, &pred).unwrap();
    near(bias.a, &want["bias_a"], "bias intercept");
    near(bias.b, &want["bias_b"], "bias slope");
    for (i, (a, b)) in masks.iter().enumerate() {
        near(
            metrics::hd95(a, b, grid).unwrap(),
            &want["hd95"][i],
            &format!("HD95 of blob pair {i}"),
        );
    }
}

fn write_run(root: &Path, cell: &str, value: Option<f64>) {
    let c = Cell::parse(cell).unwrap();
    let mut results = MetricSet::default();
    results.insert(
        c.task.main_metric(),
        value.ok_or_else(|| "the test fold has one class".to_string()),
    );
    let m = MetricsFile {
        format: METRICS_FORMAT.into(),
        task: c.task,
        fold: c.fold,
        folds: 3,
        fraction: c.fraction,
        seed: c.seed,
        init: c.init,
        checkpoint_checksum: (c.init == Init::Pretrained).then(|| "00ff".into()),
        corpus_checksum: "ff00".into(),
        tool_version: mtx_hpc::TOOL_VERSION.into(),
        params_trained: 10,
        params_total: 20,
        results,
    };
    let dir = root.join(c.relative_dir());
    std::fs::create_dir_all(&dir).unwrap();
    m.write(&dir.join(METRICS_FILE), false).unwrap();
}

#[test]
fn report_command_writes_tables_plots_and_grid_status() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let mut grid = String::from("# task fold fraction init seed\n");
    for task in Task::ALL {
        for fraction in ["1", "0.5"] {
            for init in ["pretrained", "scratch"] {
                for fold in 0..3 {
                    let cell = format!("{task} {fold} {fraction} {init} 0");
                    grid.push_str(&cell);
                    grid.push('\n');
                    let base = match task {
                        Task::Age => 6.0,
                        _ => 0.6,
                    };
                    let bonus = if init == "pretrained" { 0.1 } else { 0.0 };
                    // Leave segmentation 2 0.5 scratch missing and make one failed.
                    if cell == "segmentation 2 0.5 scratch 0" {
                        continue;
                    }
                    if cell == "segmentation 1 0.5 scratch 0" {
                        let d = runs.join(Cell::parse(&cell).unwrap().relative_dir());
                        std::fs::create_dir_all(&d).unwrap();
                        std::fs::write(d.join(FAILED_FILE), format!("{cell}\nout of memory\n"))
                            .unwrap();
                        continue;
                    }
                    let value = (task != Task::Diagnosis || fold != 0 || init == "scratch")
                        .then_some(base + bonus + 0.01 * fold as f64);
                    write_run(&runs, &cell, value);
                }
            }
        }
    }
    let grid_file = dir.path().join("grid.txt");
    std::fs::write(&grid_file, &grid).unwrap();
    let out = dir.path().join("report");
    let args = [
        "report",
        runs.to_str().unwrap(),
        "--grid-file",
        grid_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--bootstrap",
        "500",
    ];
    let res = common::mtx(&args);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        stdout.contains("34 runs, 1 failed cells; grid: 34 of 36 done, 1 failed, 1 missing"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("- cell 34 (line 36) `segmentation 1 0.5 scratch 0`: out of memory"),
        "{md}"
    );
    assert!(
        md.contains("- cell 35 (line 37) `segmentation 2 0.5 scratch 0`"),
        "{md}"
    );
    // Diagnosis fold 0 pretrained is null: two pairs left at each fraction, both +0.1.
    assert!(
        md.contains("| 1 | 2 | 1 | 0.1000 | [0.1000, 0.1000] |"),
        "{md}"
    );
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert!(
        csv.contains("\nage,1,pretrained,mae,3,0,6.11,0.01,6.1,6.12,,\n"),
        "{csv}"
    );
    assert!(
        csv.contains("\ndiagnosis,0.5,pretrained,auc,2,1,0.715,"),
        "{csv}"
    );
    for task in Task::ALL {
        let svg = std::fs::read_to_string(out.join(format!("{task}.svg"))).unwrap();
        assert_eq!(svg.matches("<circle").count(), 4, "{task}");
    }
    // Byte-identical when run again.
    let first: Vec<Vec<u8>> = ["report.md", "report.csv", "age.svg"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    assert!(common::mtx(&args).status.success());
    for (f, bytes) in ["report.md", "report.csv", "age.svg"].iter().zip(first) {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), bytes, "{f} changed");
    }

    // A bad grid line: exit 1, the file and line named, nothing written.
    std::fs::write(&grid_file, "age 0 1 scratch 0\nage 0 2 scratch 0\n").unwrap();
    let fresh = dir.path().join("fresh");
    let res = common::mtx(&[
        "report",
        runs.to_str().unwrap(),
        "--grid-file",
        grid_file.to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1));
    assert!(
        stderr.contains("grid.txt line 2: label fraction 2 is outside (0, 1]"),
        "{stderr}"
    );
    assert!(!fresh.exists());
    // A corrupt metrics.json: named.
    let bad = runs
        .join("age/fraction-1/scratch/fold-0-seed-0")
        .join(METRICS_FILE);
    std::fs::write(&bad, "{}").unwrap();
    let res = common::mtx(&["report", runs.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1));
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("fold-0-seed-0/metrics.json: not a valid metrics.json"),
        "{stderr}"
    );
}
