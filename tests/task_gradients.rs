//! The fine-tuning model's gradients with a scalar head (diagnosis logit, standardised age):
//! encoder -> transformer per plane -> mean of each plane's tokens -> `head.fc`, against
//! central finite differences in f64, with the encoder trained and frozen.
mod common;

use mtx_hpc::backend::cpu::Cpu64;
use mtx_hpc::model::objective::Net;
use mtx_hpc::model::task::{self, Scalar};
use mtx_hpc::model::{Head, Layout, ModelConfig, Part, Plane, Preset, init};
use mtx_hpc::rng;

fn check(head: Head, kind: Scalar, train_encoder: bool) {
    let be = Cpu64;
    let cfg = ModelConfig::preset(Preset::Tiny);
    let layout = Layout::with_head(&cfg, head);
    let net = Net::new(&cfg);
    let params: Vec<f64> = init::init_params(&layout, 5)
        .into_iter()
        .map(f64::from)
        .collect();
    let vols = common::blob_volumes(cfg.grid, 3, 4);
    let targets = match kind {
        Scalar::Logit => vec![1.0, 0.0, 1.0],
        Scalar::Value => vec![0.7, -1.2, 0.1],
    };
    let pos = Plane::ALL.map(|pl| {
        let (n, _, _) = pl.geometry(cfg.grid);
        init::positions(n, cfg.d, cfg.pos_base)
            .into_iter()
            .map(f64::from)
            .collect::<Vec<f64>>()
    });
    let loss = |p: &[f64], g: Option<&mut Vec<f64>>| {
        let p = p.to_vec();
        task::scalar_head(
            &be,
            &net,
            &p,
            g,
            &layout,
            &pos,
            &vols,
            &targets,
            kind,
            train_encoder,
        )
        .0
    };
    let mut grad = vec![0.0; params.len()];
    let l0 = loss(&params, Some(&mut grad));
    assert!(l0.is_finite() && l0 > 0.0, "loss {l0}");
    let trained = if train_encoder {
        0..layout.total()
    } else {
        0..layout.part_range(Part::Transformer).end
    };
    for part in Part::ALL {
        let r = layout.part_range(part);
        let any = grad[r.clone()].iter().any(|&g| g != 0.0);
        assert_eq!(
            any,
            trained.contains(&r.start),
            "{part:?}: gradient present = {any}"
        );
    }
    let h = 1e-6;
    // Directional derivatives over everything trained.
    for seed in 0..2 {
        let mut r = rng::keyed(seed, &[head as u64], "direction");
        let mut u = vec![0.0; params.len()];
        for i in trained.clone() {
            u[i] = rng::unit(&mut r) - 0.5;
        }
        let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.iter_mut().for_each(|v| *v /= norm);
        let shifted =
            |s: f64| -> Vec<f64> { params.iter().zip(&u).map(|(p, d)| p + s * h * d).collect() };
        let numeric = (loss(&shifted(1.0), None) - loss(&shifted(-1.0), None)) / (2.0 * h);
        let analytic: f64 = grad.iter().zip(&u).map(|(g, d)| g * d).sum();
        let rel = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
        assert!(
            rel < 1e-4,
            "direction {seed}: {numeric} vs {analytic} ({rel:.2e})"
        );
    }
    // One coordinate in every trained tensor.
    for e in layout.iter().filter(|e| trained.contains(&e.offset)) {
        let i = e.offset + e.len / 2;
        let mut p = params.clone();
        p[i] += h;
        let up = loss(&p, None);
        p[i] -= 2.0 * h;
        let numeric = (up - loss(&p, None)) / (2.0 * h);
        let a = grad[i];
        assert!(
            (numeric - a).abs() <= 1e-3 * numeric.abs().max(a.abs()) + 1e-8,
            "{}: numeric {numeric} vs analytic {a}",
            e.name
        );
    }
}

#[test]
fn diagnosis_head_gradients_match_finite_differences() {
    check(Head::Classify, Scalar::Logit, true);
}

#[test]
fn age_head_gradients_match_finite_differences_with_a_frozen_encoder() {
    check(Head::Regress, Scalar::Value, false);
}

#[test]
fn binary_cross_entropy_is_stable_and_correct() {
    for (y, t) in [(0.3f64, 1.0f64), (-2.0, 0.0), (1.5, 0.0), (-0.7, 1.0)] {
        let (l, _) = task::scalar_loss(Scalar::Logit, y, t);
        let p = 1.0 / (1.0 + (-y).exp());
        let want = -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
        assert!((l - want).abs() < 1e-12, "{y} {t}: {l} vs {want}");
    }
    // Far out, where 1 - p rounds to 0: the loss is |y| to within e^-40, not inf.
    for (y, t) in [(40.0f64, 0.0f64), (-40.0, 1.0)] {
        let (l, g) = task::scalar_loss(Scalar::Logit, y, t);
        assert!((l - 40.0).abs() < 1e-12, "{y} {t}: {l}");
        assert!((g.abs() - 1.0).abs() < 1e-12, "{y} {t}: gradient {g}");
    }
    for (y, t) in [(0.3f64, 1.0f64), (-2.0, 0.0)] {
        let (_, g) = task::scalar_loss(Scalar::Logit, y, t);
        let p = 1.0 / (1.0 + (-y).exp());
        assert!((g - (p - t)).abs() < 1e-12);
    }
}
