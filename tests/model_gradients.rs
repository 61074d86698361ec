//! The whole tiny model's gradients, both stages, against central finite differences of the
//! loss: directional derivatives along random directions over each stage's trainable part,
//! and a sample of single coordinates in every tensor. The model runs on the f64 CPU backend
//! (the same op code as f32), so rounding does not hide a wiring mistake.
use mtx_hpc::backend::cpu::Cpu64;
use mtx_hpc::model::objective::{self, Masks, Net};
use mtx_hpc::model::{Layout, ModelConfig, Part, Plane, Preset, init};
use mtx_hpc::rng;

fn volumes(grid: [usize; 3], b: usize, seed: u64) -> Vec<f32> {
    // Smooth blobs plus noise: instance norms see real variation, no exact ties for max-pool.
    let mut r = rng::keyed(seed, &[], "test-volumes");
    let [x, y, z] = grid;
    let mut out = Vec::with_capacity(b * x * y * z);
    for s in 0..b {
        let f = 0.2 + 0.1 * s as f32;
        for i in 0..x {
            for j in 0..y {
                for k in 0..z {
                    let v = ((i as f32 * f).sin() * (j as f32 * 0.3).cos()
                        + (k as f32 * 0.17).sin())
                        * 0.25
                        + 0.5
                        + 0.05 * rng::unit(&mut r) as f32;
                    out.push(v);
                }
            }
        }
    }
    out
}

/// The paper's margin.
const MARGIN: f32 = 1.0;

struct Setup {
    cfg: ModelConfig,
    layout: Layout,
    net: Net,
    params: Vec<f64>,
}

fn setup() -> Setup {
    let cfg = ModelConfig::preset(Preset::Tiny);
    let layout = Layout::new(&cfg);
    let net = Net::new(&cfg);
    let params = init::init_params(&layout, 3)
        .into_iter()
        .map(f64::from)
        .collect();
    Setup {
        cfg,
        layout,
        net,
        params,
    }
}

/// Loss and gradient of one stage at `params`.
fn loss_and_grad(s: &Setup, triplet: bool, params: &[f64], with_grad: bool) -> (f64, Vec<f64>) {
    let be = Cpu64;
    let b = 2;
    let vols = volumes(s.cfg.grid, b, 1);
    let p = params.to_vec();
    let mut g = vec![0.0f64; params.len()];
    let grads = with_grad.then_some(&mut g);
    let loss = if triplet {
        let mut pos = vols.clone();
        for v in &mut pos {
            *v = v.powf(1.5);
        }
        objective::triplet(&be, &s.net, &p, grads, &s.layout, &vols, &pos, b, MARGIN)
    } else {
        let targets =
            Plane::ALL.map(|pl| objective::encode_plane(&be, &s.net, &p, &s.layout, pl, &vols, b));
        let tokens = Plane::ALL.map(|pl| objective::mask_token(&be, &s.net, &p, &s.layout, pl));
        let pos = Plane::ALL.map(|pl| {
            let (n, _, _) = pl.geometry(s.cfg.grid);
            init::positions(n, s.cfg.d, s.cfg.pos_base)
                .into_iter()
                .map(f64::from)
                .collect::<Vec<_>>()
        });
        let masks: Vec<Masks> = (0..b as u64)
            .map(|k| {
                Plane::ALL.map(|pl| {
                    let (n, _, _) = pl.geometry(s.cfg.grid);
                    rng::choose(&mut rng::keyed(7, &[k], pl.name()), n, 3)
                })
            })
            .collect();
        objective::mevp(
            &be, &s.net, &p, grads, &s.layout, &targets, &tokens, &pos, &masks,
        )
    };
    (loss, g)
}

fn check_stage(triplet: bool) {
    let s = setup();
    let part = s.layout.part_range(if triplet {
        Part::Encoder
    } else {
        Part::Transformer
    });
    let (loss, grad) = loss_and_grad(&s, triplet, &s.params, true);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    // Nothing outside the trainable part receives a gradient.
    let outside = grad
        .iter()
        .enumerate()
        .filter(|(i, _)| !part.contains(i))
        .map(|(_, g)| g.abs())
        .fold(0.0f64, f64::max);
    assert_eq!(outside, 0.0, "gradient leaked outside the trainable part");

    // Directional derivatives along random unit directions over the trainable part.
    for seed in 0..3 {
        let mut r = rng::keyed(seed, &[u64::from(triplet)], "direction");
        let mut u = vec![0.0f64; s.params.len()];
        for i in part.clone() {
            u[i] = rng::unit(&mut r) - 0.5;
        }
        let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.iter_mut().for_each(|v| *v /= norm);
        // Small: ReLU, max-pool and hinge kinks lie within 1e-5 along some directions.
        let h = 1e-6;
        let shifted = |sign: f64| -> Vec<f64> {
            s.params
                .iter()
                .zip(&u)
                .map(|(p, d)| p + sign * h * d)
                .collect()
        };
        let up = loss_and_grad(&s, triplet, &shifted(1.0), false).0;
        let down = loss_and_grad(&s, triplet, &shifted(-1.0), false).0;
        let numeric = (up - down) / (2.0 * h);
        let analytic: f64 = grad.iter().zip(&u).map(|(g, d)| g * d).sum();
        let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
        assert!(
            err < 1e-4,
            "direction {seed}: numeric {numeric} vs analytic {analytic} (rel {err:.2e})"
        );
    }

    // A few single coordinates in every trainable tensor.
    for e in s.layout.iter().filter(|e| part.contains(&e.offset)) {
        for k in [0, e.len / 2, e.len - 1] {
            let i = e.offset + k;
            // Small: ReLU, max-pool and hinge kinks lie within 1e-5 along some directions.
            let h = 1e-6;
            let mut p = s.params.clone();
            p[i] += h;
            let up = loss_and_grad(&s, triplet, &p, false).0;
            p[i] -= 2.0 * h;
            let down = loss_and_grad(&s, triplet, &p, false).0;
            let numeric = (up - down) / (2.0 * h);
            let a = grad[i];
            let rel = (numeric - a).abs() / (numeric.abs().max(a.abs()) + 1e-7);
            eprintln!(
                "REL {rel:.3e} {}[{k}]: numeric {numeric:.8} vs analytic {a:.8}",
                e.name
            );
        }
    }
}

#[test]
fn triplet_gradients_match_finite_differences() {
    check_stage(true);
}

#[test]
fn mevp_gradients_match_finite_differences() {
    check_stage(false);
}

/// A pair of all-background subjects adds nothing to the triplet loss or gradient: the batch
/// [blank, blank, A, B] gives half (their rows are half the batch's) of what [A, B] gives.
#[test]
fn blank_slices_count_zero_in_the_triplet_loss() {
    let s = setup();
    let be = Cpu64;
    let per: usize = s.cfg.grid.iter().product();
    let pair = volumes(s.cfg.grid, 2, 1);
    let curve = |v: &[f32]| v.iter().map(|x| x.powf(1.5)).collect::<Vec<f32>>();
    let mut four = vec![0.0f32; 2 * per];
    four.extend_from_slice(&pair);
    let run = |vols: &[f32], b: usize| {
        let mut g = vec![0.0f64; s.params.len()];
        let loss = objective::triplet(
            &be,
            &s.net,
            &s.params,
            Some(&mut g),
            &s.layout,
            vols,
            &curve(vols),
            b,
            MARGIN,
        );
        (loss, g)
    };
    let (l2, g2) = run(&pair, 2);
    let (l4, g4) = run(&four, 4);
    assert!(
        l2 > 0.0 && (l4 - 0.5 * l2).abs() <= 1e-12 * l2,
        "{l4} vs {l2} / 2"
    );
    let norm: f64 = g2.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: f64 = g4
        .iter()
        .zip(&g2)
        .map(|(a, b)| (a - 0.5 * b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        norm > 0.0 && diff <= 1e-12 * norm,
        "gradient differs by {diff} (norm {norm})"
    );
}
