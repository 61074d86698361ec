//! The whole segmentation objective of the tiny model (encoder, transformer, decoder, Dice +
//! cross-entropy over the three planes) against central finite differences, on the f64 CPU
//! backend: directional derivatives along random directions over the whole buffer, and three
//! coordinates of every tensor of the layout with the segmentation head. Also: a frozen
//! encoder gets nothing and changes nothing else, the last backward pass finishes gradients
//! in layout order, and the 3-D probability map is the mean of the planes' softmax maps.
mod common;

use mtx_hpc::backend::Backend;
use mtx_hpc::backend::cpu::Cpu64;
use mtx_hpc::model::decoder::{self, CLASSES};
use mtx_hpc::model::objective::Net;
use mtx_hpc::model::params::ParamIndex;
use mtx_hpc::model::{Head, Layout, ModelConfig, Part, Plane, Preset, init, task};
use mtx_hpc::rng;
use std::cell::{Cell, RefCell};
use std::ops::Range;

/// BraTS codes: subject 0 has a tumour (enhancing rim 4 around a necrotic core 1, oedema 2
/// around both), subject 1 none, so its tumour classes are absent.
fn labels(grid: [usize; 3]) -> Vec<u8> {
    let [x, y, z] = grid;
    let mut out = vec![0u8; 2 * x * y * z];
    let centre = [x as f64 * 0.6, y as f64 * 0.45, z as f64 * 0.55];
    for i in 0..x {
        for j in 0..y {
            for k in 0..z {
                let d = [i, j, k]
                    .iter()
                    .zip(&centre)
                    .map(|(&a, c)| (a as f64 - c).powi(2))
                    .sum::<f64>()
                    .sqrt();
                out[(i * y + j) * z + k] = match d {
                    d if d < 2.5 => 1,
                    d if d < 4.0 => 4,
                    d if d < 7.0 => 2,
                    _ => 0,
                };
            }
        }
    }
    out
}

struct Setup {
    layout: Layout,
    net: Net,
    params: Vec<f64>,
    pos: [Vec<f64>; 3],
    vols: Vec<f32>,
    labels: Vec<u8>,
}

const B: usize = 2;

fn setup() -> Setup {
    let cfg = ModelConfig::preset(Preset::Tiny);
    let layout = Layout::with_head(&cfg, Head::Segment);
    let params = init::init_params(&layout, 3)
        .into_iter()
        .map(f64::from)
        .collect();
    let pos = Plane::ALL.map(|pl| {
        let (n, _, _) = pl.geometry(cfg.grid);
        init::positions(n, cfg.d, cfg.pos_base)
            .into_iter()
            .map(f64::from)
            .collect()
    });
    Setup {
        net: Net::new(&cfg),
        vols: common::blob_volumes(cfg.grid, B, 1),
        labels: labels(cfg.grid),
        layout,
        params,
        pos,
    }
}

fn loss_and_grad(
    s: &Setup,
    params: &[f64],
    with_grad: bool,
    train_encoder: bool,
) -> (f64, Vec<f64>) {
    let p = params.to_vec();
    let mut g = vec![0.0f64; params.len()];
    let grads = with_grad.then_some(&mut g);
    let loss = decoder::segment_loss(
        &Cpu64,
        &s.net,
        &p,
        grads,
        &s.layout,
        &s.pos,
        &s.vols,
        &s.labels,
        B,
        train_encoder,
        // Tumour voxels weighted in the cross-entropy (`--tumour-weight`), checked too.
        3.0,
    );
    (loss, g)
}

/// The loss at `params + h u` and `params - h u`.
fn shifted(s: &Setup, u: &[f64], h: f64) -> (f64, f64) {
    let at = |t: f64| -> f64 {
        let p: Vec<f64> = s.params.iter().zip(u).map(|(p, d)| p + t * d).collect();
        loss_and_grad(s, &p, false, true).0
    };
    (at(h), at(-h))
}

/// The step of a central difference: 1e-6 (ReLU and max-pool kinks lie within 1e-5 along
/// some directions), but 1e-4 within the transformer, whose gradients here are 1e-5 to 1e-4
/// (it reaches the loss through the decoder's token layer only), so that the loss's rounding
/// noise (about 5e-14 / h) stays far below them.
fn step(part: Part) -> f64 {
    match part {
        Part::Transformer => 1e-4,
        _ => 1e-6,
    }
}

/// How an analytic derivative compared with the differences of the loss.
enum Verdict {
    /// Matches the central difference: `|a - n| <= 1e-5 max(|a|, |n|) + 5e-14 / h` (the
    /// loss sums about 10^5 terms per plane; its rounding puts a few 1e-14 / h into a
    /// central difference). Carries the central difference.
    Central(f64),
    /// A ReLU or max-pool kink lies within h: the central difference averages two slopes,
    /// and the analytic derivative is one of them (the one-sided difference on its side,
    /// within 1e-4, the one-sided truncation error at h = 1e-6).
    Kink,
    Wrong(String),
}

fn verdict(a: f64, loss: f64, (up, down): (f64, f64), h: f64) -> Verdict {
    let central = (up - down) / (2.0 * h);
    let err = (central - a).abs();
    if err <= 1e-5 * central.abs().max(a.abs()) + 5e-14 / h {
        return Verdict::Central(central);
    }
    let (right, left) = ((up - loss) / h, (loss - down) / h);
    let near = |n: f64| (n - a).abs() <= 1e-4 * n.abs().max(a.abs()) + 1e-7;
    if near(right) || near(left) {
        Verdict::Kink
    } else {
        Verdict::Wrong(format!(
            "analytic {a} vs central {central}, right {right}, left {left}"
        ))
    }
}

/// The whole objective: directional derivatives along random directions (one over the whole
/// buffer, one within each part), the middle coordinate of every tensor, and the first and
/// last coordinates of every decoder tensor.
#[test]
fn segmentation_gradients_match_finite_differences() {
    let s = setup();
    let (loss, grad) = loss_and_grad(&s, &s.params, true, true);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    for p in Part::ALL {
        let r = s.layout.part_range(p);
        assert!(grad[r].iter().any(|&g| g != 0.0), "{p:?} got no gradient");
    }
    let mut failures = Vec::new();
    let mut kinks = Vec::new();
    // Worst relative error where the noise floor is under 0.1 % of the gradient, and worst
    // absolute error, per group.
    let mut judge = |what: String, a: f64, u: &[f64], h: f64, worst: &mut (f64, f64)| match verdict(
        a,
        loss,
        shifted(&s, u, h),
        h,
    ) {
        Verdict::Central(n) => {
            let err = (a - n).abs();
            if a.abs() > 1000.0 * 5e-14 / h {
                worst.0 = worst.0.max(err / a.abs());
            }
            worst.1 = worst.1.max(err);
            if what.starts_with("direction") {
                println!("{what}: analytic {a:.9e}, numeric {n:.9e}");
            }
        }
        Verdict::Kink => kinks.push(what),
        Verdict::Wrong(why) => failures.push(format!("{what}: {why}")),
    };

    // Along the transformer's direction the derivative is about 1e-6: a longer step.
    let direction_step = |p| match p {
        Part::Transformer => 1e-3,
        _ => step(p),
    };
    let directions = [(0..s.params.len(), 1e-6)]
        .into_iter()
        .chain(Part::ALL.map(|p| (s.layout.part_range(p), direction_step(p))));
    let mut worst_dir = (0.0f64, 0.0f64);
    for (seed, (range, h)) in directions.enumerate() {
        let mut r = rng::keyed(seed as u64, &[], "direction");
        let mut u = vec![0.0; s.params.len()];
        for i in range.clone() {
            u[i] = rng::unit(&mut r) - 0.5;
        }
        let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.iter_mut().for_each(|v| *v /= norm);
        let a: f64 = grad.iter().zip(&u).map(|(g, d)| g * d).sum();
        let what = format!("direction {seed} over {range:?}");
        judge(what, a, &u, h, &mut worst_dir);
    }

    let mut worst = [(0.0f64, 0.0f64); 3];
    for e in s.layout.iter() {
        let picks = match e.part {
            Part::Head => vec![0, e.len / 2, e.len - 1],
            _ => vec![e.len / 2],
        };
        let part = Part::ALL.iter().position(|&p| p == e.part).unwrap();
        for k in picks {
            let mut u = vec![0.0; s.params.len()];
            u[e.offset + k] = 1.0;
            let what = format!("{}[{k}]", e.name);
            judge(what, grad[e.offset + k], &u, step(e.part), &mut worst[part]);
        }
    }
    let show = |(rel, abs): (f64, f64)| format!("{rel:.1e} (absolute {abs:.1e})");
    println!(
        "segmentation loss {loss:.6}; max relative error where |gradient| > 5e-11 / h: directions \
         {}, decoder {}, transformer {}, encoder {}; at a kink: {kinks:?}",
        show(worst_dir),
        show(worst[0]),
        show(worst[1]),
        show(worst[2])
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(kinks.len() <= 3, "too many kinks: {kinks:?}");
}

/// A frozen encoder gets no gradient, and the decoder and transformer get exactly what they
/// get when the encoder trains.
#[test]
fn a_frozen_encoder_gets_nothing_and_changes_nothing_else() {
    let s = setup();
    let (l1, trained) = loss_and_grad(&s, &s.params, true, true);
    let (l2, frozen) = loss_and_grad(&s, &s.params, true, false);
    assert_eq!(l1, l2);
    let enc = s.layout.part_range(Part::Encoder);
    assert!(frozen[enc.clone()].iter().all(|&g| g == 0.0));
    assert!(trained[..enc.start] == frozen[..enc.start]);
    assert!(trained[enc].iter().any(|&g| g != 0.0));
    let (l3, _) = loss_and_grad(&s, &s.params, false, true);
    assert_eq!(l1, l3);
}

/// Where the last backward pass writes gradients (the trainer's overlapped all-reduce sends
/// a bucket once the pass has moved past it).
struct Recorder<'a> {
    layout: &'a Layout,
    last: Cell<bool>,
    offsets: RefCell<Vec<usize>>,
}

impl ParamIndex for Recorder<'_> {
    fn range_of(&self, name: &str) -> Range<usize> {
        self.layout.range_of(name)
    }
    fn gradients_below<B: Backend>(&self, _be: &B, _grads: &B::Buf, offset: usize) {
        if self.last.get() {
            self.offsets.borrow_mut().push(offset);
        }
    }
    fn last_pass(&self) {
        self.last.set(true);
    }
}

#[test]
fn the_last_pass_finishes_gradients_in_layout_order() {
    let s = setup();
    let rec = Recorder {
        layout: &s.layout,
        last: Cell::new(false),
        offsets: RefCell::new(Vec::new()),
    };
    let mut g = vec![0.0; s.params.len()];
    decoder::segment_loss(
        &Cpu64,
        &s.net,
        &s.params,
        Some(&mut g),
        &rec,
        &s.pos,
        &s.vols,
        &s.labels,
        B,
        true,
        1.0,
    );
    let offsets = rec.offsets.into_inner();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    for p in Part::ALL {
        let r = s.layout.part_range(p);
        assert!(
            offsets.iter().any(|o| r.contains(o)),
            "{p:?} not in the last pass"
        );
    }
}

/// The 3-D map: probabilities summing to 1 per voxel, each the mean of the three planes'
/// softmax at that voxel (recomputed here from the decoder's logits).
#[test]
fn the_probability_map_averages_the_three_planes() {
    let s = setup();
    let be = Cpu64;
    let grid = s.net.grid;
    let per: usize = grid.iter().product();
    let probs = decoder::segment_probs(&be, &s.net, &s.params, &s.layout, &s.pos, &s.vols, B);
    assert_eq!(probs.len(), B * CLASSES * per);
    for sub in 0..B {
        for v in 0..per {
            let sum: f32 = (0..CLASSES)
                .map(|c| probs[(sub * CLASSES + c) * per + v])
                .sum();
            assert!((sum - 1.0).abs() < 1e-5, "{sub} {v}: {sum}");
        }
    }
    let planes = task::contextualise(&be, &s.net, &s.params, &s.layout, &s.pos, &s.vols, B, true);
    let logits: Vec<Vec<f64>> = planes
        .iter()
        .map(|pl| {
            let (n, h, w) = pl.plane.geometry(grid);
            let enc = pl.encoder.as_ref().unwrap();
            decoder::forward(
                &be,
                &s.net.encoder,
                &s.params,
                &s.layout,
                enc,
                &pl.tokens,
                B * n,
                h,
                w,
            )
            .0
        })
        .collect();
    let [gx, gy, gz] = grid;
    for (sub, x, y, z) in [
        (0, 19, 17, 17),
        (1, 3, 30, 9),
        (0, 0, 0, 0),
        (1, 31, 37, 31),
    ] {
        let mut want = [0.0f64; CLASSES];
        for (pl, lg) in planes.iter().zip(&logits) {
            let (n, h, w) = pl.plane.geometry(grid);
            // (slice, row, column) of voxel (x, y, z) in this plane.
            let (k, i, j) = match pl.plane {
                Plane::Axial => (z, x, y),
                Plane::Sagittal => (x, y, z),
                Plane::Coronal => (y, x, z),
            };
            let at = |c: usize| lg[((sub * n + k) * CLASSES + c) * h * w + i * w + j];
            let norm: f64 = (0..CLASSES).map(|c| at(c).exp()).sum();
            for (c, p) in want.iter_mut().enumerate() {
                *p += at(c).exp() / norm / 3.0;
            }
        }
        let v = (x * gy + y) * gz + z;
        assert!(v < gx * gy * gz);
        for (c, w) in want.iter().enumerate() {
            let got = probs[(sub * CLASSES + c) * per + v];
            assert!(
                (got as f64 - w).abs() < 1e-6,
                "{sub} ({x}, {y}, {z}) class {c}: {got} vs {w}"
            );
        }
    }
}
