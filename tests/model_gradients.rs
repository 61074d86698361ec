//! The whole tiny model's gradients, both stages and every MEVP option (joint sequence,
//! dropout with fixed masks, trainable encoder with detached targets), against central finite
//! differences of the loss: directional derivatives along random directions over each case's
//! trainable part, and a sample of single coordinates in every tensor. The model runs on the
//! f64 CPU backend (the same op code as f32), so rounding does not hide a wiring mistake.
mod common;

use common::blob_volumes as volumes;
use mtx_hpc::backend::cpu::Cpu64;
use mtx_hpc::model::objective::{self, DropoutDraw, Masks, MevpOptions, Net};
use mtx_hpc::model::{Layout, ModelConfig, Part, Plane, Preset, init};
use mtx_hpc::rng;

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

/// What a gradient check runs: one stage, and for MEVP the options the paper leaves open.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Triplet,
    /// Frozen encoder, per-plane sequences, no dropout (the paper).
    Mevp,
    /// Frozen encoder, one joint sequence of the three planes.
    MevpJoint,
    /// Frozen encoder, dropout 0.25 with masks fixed by their keys.
    MevpDropout,
    /// Encoder trained too: gradients through the input vectors and the [MASK] vectors.
    MevpTrainable,
    /// Trainable encoder, joint sequence and dropout together.
    MevpAllOptions,
}

impl Case {
    fn trainable(self) -> bool {
        matches!(self, Case::MevpTrainable | Case::MevpAllOptions)
    }

    /// The parameters this case trains.
    fn part(self, l: &Layout) -> std::ops::Range<usize> {
        match self {
            Case::Triplet => l.part_range(Part::Encoder),
            _ if self.trainable() => {
                l.part_range(Part::Transformer).start..l.part_range(Part::Encoder).end
            }
            _ => l.part_range(Part::Transformer),
        }
    }

    fn options(self) -> MevpOptions {
        let dropout = || DropoutDraw {
            p: 0.25,
            seed: 11,
            key: 3,
            subjects: vec![5, 9],
        };
        match self {
            Case::MevpJoint => MevpOptions {
                joint: true,
                dropout: None,
            },
            Case::MevpDropout => MevpOptions {
                joint: false,
                dropout: Some(dropout()),
            },
            Case::MevpAllOptions => MevpOptions {
                joint: true,
                dropout: Some(dropout()),
            },
            _ => MevpOptions::default(),
        }
    }
}

/// The batch: two volumes, their positives, masks, position codes, and the encoder's vectors
/// and [MASK] vectors at the base parameters (the targets every MEVP case holds fixed).
struct Batch {
    b: usize,
    vols: Vec<f32>,
    positives: Vec<f32>,
    masks: Vec<Masks>,
    pos: [Vec<f64>; 3],
    targets: [Vec<f64>; 3],
    tokens: [Vec<f64>; 3],
}

fn batch(s: &Setup) -> Batch {
    let be = Cpu64;
    let b = 2;
    let vols = volumes(s.cfg.grid, b, 1);
    let positives = vols.iter().map(|v| v.powf(1.5)).collect();
    let p = &s.params;
    let targets =
        Plane::ALL.map(|pl| objective::encode_plane(&be, &s.net, p, &s.layout, pl, &vols, b));
    let tokens = Plane::ALL.map(|pl| objective::mask_token(&be, &s.net, p, &s.layout, pl));
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
    Batch {
        b,
        vols,
        positives,
        masks,
        pos,
        targets,
        tokens,
    }
}

/// Loss and gradient of one case at `params`. MEVP targets stay the encoder's vectors at
/// the base parameters: the trainable-encoder loss detaches them, so the finite differences
/// must not move them either.
fn loss_and_grad(
    s: &Setup,
    x: &Batch,
    case: Case,
    params: &[f64],
    with_grad: bool,
) -> (f64, Vec<f64>) {
    let be = Cpu64;
    let p = params.to_vec();
    let mut g = vec![0.0f64; params.len()];
    let grads = with_grad.then_some(&mut g);
    let opts = case.options();
    let loss = match case {
        Case::Triplet => objective::triplet(
            &be,
            &s.net,
            &p,
            grads,
            &s.layout,
            &x.vols,
            &x.positives,
            x.b,
            MARGIN,
        ),
        _ if case.trainable() => objective::mevp_trainable(
            &be,
            &s.net,
            &p,
            grads,
            &s.layout,
            &x.vols,
            &x.pos,
            &x.masks,
            &opts,
            Some(&x.targets),
        ),
        _ => objective::mevp_with(
            &be, &s.net, &p, grads, &s.layout, &x.targets, &x.tokens, &x.pos, &x.masks, &opts,
        ),
    };
    (loss, g)
}

fn check_case(case: Case) {
    let s = setup();
    let x = batch(&s);
    let part = case.part(&s.layout);
    let (loss, grad) = loss_and_grad(&s, &x, case, &s.params, true);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    // Nothing outside the trainable part receives a gradient; every trained part does.
    let outside = grad
        .iter()
        .enumerate()
        .filter(|(i, _)| !part.contains(i))
        .map(|(_, g)| g.abs())
        .fold(0.0f64, f64::max);
    assert_eq!(outside, 0.0, "gradient leaked outside the trainable part");
    for p in Part::ALL {
        let r = s.layout.part_range(p);
        if !r.is_empty() && part.contains(&r.start) {
            assert!(grad[r].iter().any(|&g| g != 0.0), "{p:?} got no gradient");
        }
    }

    // Directional derivatives along random unit directions over the trainable part.
    for seed in 0..3 {
        let mut r = rng::keyed(seed, &[case as u64], "direction");
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
        let up = loss_and_grad(&s, &x, case, &shifted(1.0), false).0;
        let down = loss_and_grad(&s, &x, case, &shifted(-1.0), false).0;
        let numeric = (up - down) / (2.0 * h);
        let analytic: f64 = grad.iter().zip(&u).map(|(g, d)| g * d).sum();
        let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
        assert!(
            err < 1e-4,
            "{case:?} direction {seed}: numeric {numeric} vs analytic {analytic} (rel {err:.2e})"
        );
    }

    // A few single coordinates in every trainable tensor (one for the combined options, whose
    // parts are each checked above).
    let picks = |len: usize| match case {
        Case::MevpAllOptions => vec![len / 2],
        _ => vec![0, len / 2, len - 1],
    };
    for e in s.layout.iter().filter(|e| part.contains(&e.offset)) {
        for k in picks(e.len) {
            let i = e.offset + k;
            // Small: ReLU, max-pool and hinge kinks lie within 1e-5 along some directions.
            let h = 1e-6;
            let mut p = s.params.clone();
            p[i] += h;
            let up = loss_and_grad(&s, &x, case, &p, false).0;
            p[i] -= 2.0 * h;
            let down = loss_and_grad(&s, &x, case, &p, false).0;
            let numeric = (up - down) / (2.0 * h);
            let a = grad[i];
            let rel = (numeric - a).abs() / (numeric.abs().max(a.abs()) + 1e-7);
            eprintln!(
                "REL {rel:.3e} {}[{k}]: numeric {numeric:.8} vs analytic {a:.8}",
                e.name
            );
            // Central differences at h = 1e-6 carry about 1e-10 of rounding noise.
            assert!(
                (numeric - a).abs() <= 1e-3 * numeric.abs().max(a.abs()) + 1e-8,
                "{case:?} {}[{k}]: numeric {numeric} vs analytic {a}",
                e.name
            );
        }
    }
}

#[test]
fn triplet_gradients_match_finite_differences() {
    check_case(Case::Triplet);
}

#[test]
fn mevp_gradients_match_finite_differences() {
    check_case(Case::Mevp);
}

#[test]
fn joint_sequence_gradients_match_finite_differences() {
    check_case(Case::MevpJoint);
}

#[test]
fn dropout_gradients_match_finite_differences_with_a_fixed_mask() {
    check_case(Case::MevpDropout);
}

#[test]
fn trainable_encoder_gradients_match_finite_differences() {
    check_case(Case::MevpTrainable);
}

#[test]
fn all_mevp_options_together_match_finite_differences() {
    check_case(Case::MevpAllOptions);
}

/// The options change what they should and nothing else: dropout 0 is the paper's model bit
/// for bit, dropout masks depend on their keys, the joint sequence attends across planes, and
/// the trainable-encoder loss trains the transformer exactly as the frozen one does while
/// its targets are the encoder's own vectors, detached.
#[test]
fn mevp_options_change_what_they_should() {
    use mtx_hpc::backend::cpu::Cpu;
    let s = setup();
    let be = Cpu;
    let x = batch(&s);
    let params: Vec<f32> = s.params.iter().map(|&v| v as f32).collect();
    let f32s = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    // The encoder's vectors in f32, as the f32 model computes them.
    let targets = Plane::ALL
        .map(|pl| objective::encode_plane(&be, &s.net, &params, &s.layout, pl, &x.vols, x.b));
    let tokens = Plane::ALL.map(|pl| objective::mask_token(&be, &s.net, &params, &s.layout, pl));
    let pos = x.pos.each_ref().map(|t| f32s(t));
    let run = |opts: &MevpOptions| {
        let mut g = vec![0.0f32; params.len()];
        let l = objective::mevp_with(
            &be,
            &s.net,
            &params,
            Some(&mut g),
            &s.layout,
            &targets,
            &tokens,
            &pos,
            &x.masks,
            opts,
        );
        (l, g)
    };
    let paper = {
        let mut g = vec![0.0f32; params.len()];
        let l = objective::mevp(
            &be,
            &s.net,
            &params,
            Some(&mut g),
            &s.layout,
            &targets,
            &tokens,
            &pos,
            &x.masks,
        );
        (l, g)
    };
    let draw = |p: f32, key: u64| DropoutDraw {
        p,
        seed: 11,
        key,
        subjects: vec![5, 9],
    };
    let with = |joint: bool, dropout: Option<DropoutDraw>| MevpOptions { joint, dropout };
    // Dropout 0, given explicitly, is the paper's model bit for bit.
    assert!(run(&with(false, Some(draw(0.0, 3)))) == paper);
    assert!(run(&MevpOptions::default()) == paper);
    // Dropout draws: a fixed key repeats its masks, another key draws others.
    let d3 = run(&with(false, Some(draw(0.25, 3))));
    assert!(d3 == run(&with(false, Some(draw(0.25, 3)))));
    assert_ne!(d3.0, paper.0);
    assert_ne!(d3.0, run(&with(false, Some(draw(0.25, 4)))).0);
    // The joint sequence is another model (tokens attend across planes).
    let joint = run(&with(true, None));
    assert!(joint.0.is_finite() && (joint.0 - paper.0).abs() > 1e-6 * paper.0);

    // Trainable encoder: the same transformer gradient as the frozen loss, and the detached
    // targets are exactly the encoder's vectors of this step.
    let trainable = |fixed: Option<&[Vec<f32>; 3]>| {
        let mut g = vec![0.0f32; params.len()];
        let l = objective::mevp_trainable(
            &be,
            &s.net,
            &params,
            Some(&mut g),
            &s.layout,
            &x.vols,
            &pos,
            &x.masks,
            &MevpOptions::default(),
            fixed,
        );
        (l, g)
    };
    let own = trainable(None);
    let given = trainable(Some(&targets));
    assert!(own == given, "targets other than the encoder's own vectors");
    let tr = s.layout.part_range(Part::Transformer);
    assert_eq!(own.0, paper.0);
    assert!(
        own.1[tr.clone()] == paper.1[tr],
        "transformer gradients differ"
    );
    let enc = s.layout.part_range(Part::Encoder);
    assert!(own.1[enc].iter().any(|&g| g != 0.0));
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
