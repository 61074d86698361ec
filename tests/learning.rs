//! Does pretraining learn? On a small synthetic corpus at the tiny preset (PAPER.md's
//! criteria, issue 3): after MEVP, the validation loss is at least 20% below the loss of
//! predicting each masked position by the training-set mean vector of that position; after
//! triplet training, the nearest of a batch's positives to each validation anchor is its own
//! in at least 80% of cases (chance: 1 / batch).
mod common;

use common::mtx;
use mtx_hpc::backend::cpu::Cpu;
use mtx_hpc::data::corpus::Corpus;
use mtx_hpc::model::augment::Curve;
use mtx_hpc::model::objective::{self, Masks, Net};
use mtx_hpc::model::{Layout, Plane, init};
use mtx_hpc::rng;
use mtx_hpc::train::Checkpoint;
use std::path::PathBuf;

fn volumes(c: &Corpus, subjects: &[usize]) -> Vec<f32> {
    let (mut raw, mut vol, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for &s in subjects {
        c.read_volume(s, &mut raw, &mut vol).unwrap();
        out.extend_from_slice(&vol);
    }
    out
}

/// Validation subjects per "batch" of the triplet criterion (the nearest of a batch's
/// positives to each anchor must be its own; chance 1 / EVAL_BATCH).
const EVAL_BATCH: usize = 8;

/// Fraction of validation anchors whose nearest positive (among the batch's positives of the
/// same plane and slice position) is their own.
fn triplet_accuracy(
    net: &Net,
    layout: &Layout,
    params: &Vec<f32>,
    c: &Corpus,
    val: &[usize],
) -> f64 {
    let be = Cpu;
    let b = val.len();
    let per: usize = net.grid.iter().product();
    let anchors = volumes(c, val);
    let mut positives = anchors.clone();
    for k in 0..b {
        Curve::random(&mut rng::keyed(99, &[k as u64], "eval-bezier"))
            .apply(&mut positives[k * per..(k + 1) * per]);
    }
    let (mut right, mut total) = (0usize, 0usize);
    for plane in Plane::ALL {
        let (n, _, _) = plane.geometry(net.grid);
        let a = objective::encode_plane(&be, net, params, layout, plane, &anchors, b);
        let p = objective::encode_plane(&be, net, params, layout, plane, &positives, b);
        let d = net.encoder.d;
        let dist =
            |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum::<f32>();
        for s in 0..b {
            for i in 0..n {
                let row = |k: usize| (k * n + i) * d..(k * n + i + 1) * d;
                let own = &a[row(s)];
                let best = (0..b)
                    .min_by(|&x, &y| dist(own, &p[row(x)]).total_cmp(&dist(own, &p[row(y)])))
                    .unwrap();
                right += usize::from(best == s);
                total += 1;
            }
        }
    }
    right as f64 / total as f64
}

/// Mean squared error over the masked positions of plane `pl` of predicting each target by
/// its position's mean, plus (with `neighbours`) the mean of the residuals (vector minus its
/// position mean) of the unmasked slices directly next to it: a context-using predictor that a
/// one-layer transformer can express. It tells whether the context holds anything to learn.
fn masked_mse(
    masks: &[Masks],
    pl: Plane,
    n: usize,
    d: usize,
    targets: &[f32],
    mean: &[f64],
    neighbours: bool,
) -> f64 {
    let (mut sum, mut count) = (0.0, 0usize);
    for (s, m) in masks.iter().enumerate() {
        let masked = &m[pl.index()];
        let open = |u: usize| u < n && !masked.contains(&(u as u32));
        for &i in masked {
            let i = i as usize;
            let near: Vec<usize> = [i.wrapping_sub(1), i + 1]
                .into_iter()
                .filter(|&u| neighbours && open(u))
                .collect();
            for j in 0..d {
                let value = |u: usize| f64::from(targets[(s * n + u) * d + j]);
                let mut guess = mean[i * d + j];
                for &u in &near {
                    guess += (value(u) - mean[u * d + j]) / near.len() as f64;
                }
                sum += (guess - value(i)).powi(2);
                count += 1;
            }
        }
    }
    sum / count as f64
}

/// (model loss, baseline loss) of MEVP on the validation subjects.
fn mevp_vs_position_means(
    net: &Net,
    layout: &Layout,
    params: &Vec<f32>,
    c: &Corpus,
    train: &[usize],
    val: &[usize],
    grid: [usize; 3],
    pos_base: f64,
) -> (f64, f64) {
    let be = Cpu;
    let d = net.transformer.d;
    let val_vols = volumes(c, val);
    let masks: Vec<Masks> = val
        .iter()
        .map(|&s| {
            Plane::ALL.map(|pl| {
                let (n, _, _) = pl.geometry(grid);
                rng::choose(
                    &mut rng::keyed(5, &[s as u64], pl.name()),
                    n,
                    (n as f64 * 0.1) as usize,
                )
            })
        })
        .collect();
    let targets = Plane::ALL
        .map(|pl| objective::encode_plane(&be, net, params, layout, pl, &val_vols, val.len()));
    let tokens = Plane::ALL.map(|pl| objective::mask_token(&be, net, params, layout, pl));
    let pos = Plane::ALL.map(|pl| init::positions(pl.geometry(grid).0, d, pos_base));
    let model = objective::mevp(
        &be, net, params, None, layout, &targets, &tokens, &pos, &masks,
    );
    let mut baseline = 0.0;
    for pl in Plane::ALL {
        let (n, _, _) = pl.geometry(grid);
        let mut mean = vec![0.0f64; n * d];
        for chunk in train.chunks(8) {
            let v = objective::encode_plane(
                &be,
                net,
                params,
                layout,
                pl,
                &volumes(c, chunk),
                chunk.len(),
            );
            for (k, x) in v.iter().enumerate() {
                mean[k % (n * d)] += f64::from(*x) / train.len() as f64;
            }
        }
        let t = &targets[pl.index()];
        let plain = masked_mse(&masks, pl, n, d, t, &mean, false);
        let near = masked_mse(&masks, pl, n, d, t, &mean, true);
        eprintln!(
            "{}: position means {plain:.4}, + neighbours' residuals {near:.4}",
            pl.name()
        );
        baseline += plain;
    }
    (model, baseline)
}

fn corpus_and_run() -> (PathBuf, PathBuf) {
    let dir = common::shared_dir("learning");
    // 160 subjects (128 training, 32 validation): with 40, the MEVP context held nothing beyond
    // the position means (ratio 1.06); MTX_LEARN_SUBJECTS=N changes it.
    let subjects = std::env::var("MTX_LEARN_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(160);
    let corpus = common::tiny_corpus(&dir, subjects, 5);
    // The triplet stage, then MEVP from its encoder for longer: MEVP steps are ~10x cheaper.
    let stage = |name: &str, toml: &str, extra: &[&str]| {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let run = dir.join(name);
        let mut args = vec![
            "pretrain",
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ];
        args.extend([
            "--preset",
            "tiny",
            "--batch",
            "4",
            "--stage",
            name,
            "--config",
            cfg.to_str().unwrap(),
        ]);
        args.extend(extra);
        let o = mtx(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        run
    };
    // MTX_LEARN_ENCODER=FILE skips the triplet stage and starts MEVP from FILE's encoder.
    let encoder = match std::env::var("MTX_LEARN_ENCODER") {
        Ok(file) => PathBuf::from(file),
        Err(_) => stage(
            "triplet",
            "lr_triplet = 1e-3\nepochs = 12\npatience = 0\n",
            &[],
        )
        .join("final.h5"),
    };
    let mevp_cfg = std::env::var("MTX_LEARN_MEVP").unwrap_or_else(|_| {
        "lr_mevp = 1e-2\nepochs = 200\npatience = 0\ncheckpoint_every = 100000\n".into()
    });
    let run = stage(
        "mevp",
        &mevp_cfg,
        &["--init-encoder", encoder.to_str().unwrap()],
    );
    (corpus, run)
}

// Measured 2026-11-25 with 40 subjects: triplet top-1 0.831; MEVP 0.217 vs baseline 0.205
// (ratio 1.06): the context held nothing beyond the position means. 2026-11-26 with 160
// subjects and 200 MEVP epochs: triplet top-1 0.856 (batches of 8; chance 0.125), MEVP 0.6205
// vs 0.8298 (ratio 0.748, goal <= 0.8): both criteria met (docs/PERFORMANCE.md). Ignored for
// its run time, beyond this CI budget: `cargo test --release --test learning --
// --ignored --nocapture`.
#[test]
#[ignore = "minutes of synth and training (160 subjects); run with --release -- --ignored"]
fn pretraining_learns_both_objectives() {
    let (corpus_path, run) = corpus_and_run();
    let c = Corpus::open(&corpus_path).unwrap();
    let ckpt = Checkpoint::read(&run.join("final.h5")).unwrap();
    let layout = Layout::new(&ckpt.meta.model);
    let net = Net::new(&ckpt.meta.model);
    let params = ckpt.read_params(&layout).unwrap();
    let (train, val) = (c.train_indices(), c.val_indices());
    // The criterion's "batch": validation subjects in groups of EVAL_BATCH (chance 1/8), the
    // last partial group dropped; the fraction over all groups' anchors.
    let groups: Vec<&[usize]> = val.chunks_exact(EVAL_BATCH).collect();
    assert!(
        !groups.is_empty(),
        "fewer than {EVAL_BATCH} validation subjects"
    );
    let acc = groups
        .iter()
        .map(|g| triplet_accuracy(&net, &layout, &params, &c, g))
        .sum::<f64>()
        / groups.len() as f64;
    let (model, baseline) = mevp_vs_position_means(
        &net,
        &layout,
        &params,
        &c,
        &train,
        &val,
        ckpt.meta.model.grid,
        ckpt.meta.model.pos_base,
    );
    eprintln!(
        "triplet top-1 among {} positives: {acc:.3}; MEVP val {model:.4} vs position-mean baseline {baseline:.4} (ratio {:.3})",
        val.len(),
        model / baseline
    );
    assert!(acc >= 0.8, "triplet accuracy {acc}");
    assert!(
        model <= 0.8 * baseline,
        "MEVP {model} vs baseline {baseline}"
    );
}
