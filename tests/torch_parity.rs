//! Parity with PyTorch on every commit, without torch: tests/fixtures/debug_state_tiny.h5 holds
//! a tiny-preset "debug state" exported by benches/reference/export_debug_state.py from our
//! PyTorch implementation of the model (benches/reference/model.py, float64 autograd): two
//! volumes, their positives, MEVP masks, the parameters, both objectives' losses and every
//! trained tensor's gradient. Our model runs the same input on the f64 CPU backend (which
//! must agree to rounding, 1e-9 per tensor) and on the f32 backend (see [`f32_tolerance`]; the
//! issue's goal is 1e-5, and the printout shows where we stand).
//!
//! `cargo test --test torch_parity -- --nocapture` prints every tensor's relative error.
//! benches/reference/parity.py writes the same kind of file from one of our checkpoints and
//! runs the ignored test below on it.
mod common;

use mtx_hpc::backend::Backend;
use mtx_hpc::backend::cpu::{Cpu, Cpu64};
use mtx_hpc::model::objective::{self, Masks, Net};
use mtx_hpc::model::{Layout, ModelConfig, Part, Plane, Preset, init};
use std::collections::HashMap;
use std::path::Path;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/debug_state_tiny.h5"
);

/// Everything the fixture holds.
struct Fixture {
    cfg: ModelConfig,
    margin: f32,
    b: usize,
    volumes: Vec<f32>,
    positives: Vec<f32>,
    masks: Vec<Masks>,
    params: HashMap<String, Vec<f64>>,
    stages: [Stage; 2],
    /// Encoder vectors of every slice `[b * n, D]` and the [MASK] vectors, per plane.
    encoder: [Vec<f64>; 3],
    tokens: [Vec<f64>; 3],
}

/// One objective's loss and gradients, from torch or from us.
struct Stage {
    name: &'static str,
    part: Part,
    loss: f64,
    grads: HashMap<String, Vec<f64>>,
    /// PyTorch's own float32 run against its float64 run on this input: loss and largest
    /// per-tensor gradient error.
    torch_f32: (f64, f64),
}

fn read_f64(f: &hdf5::File, path: &str) -> Vec<f64> {
    f.dataset(path)
        .and_then(|d| d.read_raw::<f64>())
        .unwrap_or_else(|e| panic!("fixture: cannot read {path}: {e}"))
}

fn read_f32(f: &hdf5::File, path: &str) -> Vec<f32> {
    f.dataset(path)
        .and_then(|d| d.read_raw::<f32>())
        .unwrap_or_else(|e| panic!("fixture: cannot read {path}: {e}"))
}

fn read_str_attr(f: &hdf5::File, name: &str) -> String {
    f.attr(name)
        .and_then(|a| a.read_scalar::<hdf5::types::VarLenUnicode>())
        .unwrap_or_else(|e| panic!("fixture: attribute {name}: {e}"))
        .to_string()
}

fn load(path: &Path) -> (Layout, Fixture) {
    let f = common::h5_open(path, false);
    let preset = read_str_attr(&f, "preset");
    // A state written from a checkpoint carries the checkpoint's configuration.
    let cfg = match f.attr("model_config") {
        Ok(a) => {
            let text = a
                .read_scalar::<hdf5::types::VarLenUnicode>()
                .expect("model_config");
            toml::from_str::<ModelConfig>(text.as_str()).expect("model_config TOML")
        }
        Err(_) => ModelConfig::preset(
            Preset::from_name(&preset).unwrap_or_else(|| panic!("unknown preset {preset}")),
        ),
    };
    assert_eq!(cfg.preset.name(), preset);
    let layout = Layout::new(&cfg);
    let margin = f
        .attr("margin")
        .and_then(|a| a.read_scalar::<f64>())
        .expect("fixture: margin") as f32;
    let shape = f.dataset("input/volumes").expect("volumes").shape();
    let grid = cfg.grid;
    assert_eq!(
        shape[1..],
        grid,
        "fixture volumes are not on the preset's grid"
    );
    let b = shape[0];
    let masks_by_plane = Plane::ALL.map(|p| {
        let path = format!("input/masks_{}", p.name());
        let ds = f.dataset(&path).expect("masks");
        let k = ds.shape()[1];
        let v: Vec<i32> = ds.read_raw().expect("masks");
        (k, v)
    });
    let masks = (0..b)
        .map(|s| {
            masks_by_plane
                .each_ref()
                .map(|(k, v)| v[s * k..(s + 1) * k].iter().map(|&i| i as u32).collect())
        })
        .collect();
    let params_group = f.group("params").expect("params");
    let names = params_group.member_names().expect("params");
    let mut want: Vec<&str> = layout.iter().map(|e| e.name.as_str()).collect();
    let mut have: Vec<&str> = names.iter().map(String::as_str).collect();
    want.sort_unstable();
    have.sort_unstable();
    assert_eq!(have, want, "fixture tensors differ from the tiny layout");
    let mut params = HashMap::new();
    for e in &layout {
        let path = format!("params/{}", e.name);
        assert_eq!(
            f.dataset(&path).expect("param").shape(),
            e.shape,
            "{}",
            e.name
        );
        params.insert(e.name.clone(), read_f64(&f, &path));
    }
    let stage = |name: &'static str, part: Part| {
        let mut grads = HashMap::new();
        for e in layout.iter().filter(|e| e.part == part) {
            grads.insert(
                e.name.clone(),
                read_f64(&f, &format!("{name}/grads/{}", e.name)),
            );
        }
        let loss = f
            .dataset(&format!("{name}/loss"))
            .and_then(|d| d.read_scalar::<f64>())
            .expect("loss");
        let attr = |a: &str| {
            f.group(name)
                .and_then(|g| g.attr(a))
                .and_then(|a| a.read_scalar::<f64>())
                .unwrap_or_else(|e| panic!("fixture: {name} attribute {a}: {e}"))
        };
        Stage {
            name,
            part,
            loss,
            grads,
            torch_f32: (
                attr("torch_float32_loss_rel"),
                attr("torch_float32_largest_grad_rel"),
            ),
        }
    };
    let fx = Fixture {
        cfg: cfg.clone(),
        margin,
        b,
        volumes: read_f32(&f, "input/volumes"),
        positives: read_f32(&f, "input/positives"),
        masks,
        params,
        stages: [
            stage("mevp", Part::Transformer),
            stage("triplet", Part::Encoder),
        ],
        encoder: Plane::ALL.map(|p| read_f64(&f, &format!("forward/encoder_{}", p.name()))),
        tokens: Plane::ALL.map(|p| read_f64(&f, &format!("forward/mask_token_{}", p.name()))),
    };
    (layout, fx)
}

/// Host copies of a backend's buffers, in f64 whatever the backend's precision.
trait Host {
    fn from_f64s(v: &[f64]) -> Self;
    fn to_f64s(&self) -> Vec<f64>;
}

impl Host for Vec<f32> {
    fn from_f64s(v: &[f64]) -> Self {
        v.iter().map(|&x| x as f32).collect()
    }
    fn to_f64s(&self) -> Vec<f64> {
        self.iter().map(|&x| f64::from(x)).collect()
    }
}

impl Host for Vec<f64> {
    fn from_f64s(v: &[f64]) -> Self {
        v.to_vec()
    }
    fn to_f64s(&self) -> Vec<f64> {
        self.clone()
    }
}

/// Our model's answer to the fixture's question: forward intermediates, then both
/// objectives' losses and full gradient buffers.
struct Ours {
    encoder: [Vec<f64>; 3],
    tokens: [Vec<f64>; 3],
    /// Loss and the whole flat gradient buffer, MEVP then triplet.
    stages: [(f64, Vec<f64>); 2],
}

fn run<B: Backend>(be: &B, layout: &Layout, fx: &Fixture) -> Ours
where
    B::Buf: Host,
{
    let cfg = &fx.cfg;
    let net = Net::new(cfg);
    let mut flat = vec![0.0f64; layout.total()];
    for e in layout {
        flat[e.range()].copy_from_slice(&fx.params[&e.name]);
    }
    let params = B::Buf::from_f64s(&flat);
    let targets = Plane::ALL
        .map(|p| objective::encode_plane(be, &net, &params, layout, p, &fx.volumes, fx.b));
    let tokens = Plane::ALL.map(|p| objective::mask_token(be, &net, &params, layout, p));
    let pos = Plane::ALL.map(|p| {
        let (n, _, _) = p.geometry(cfg.grid);
        be.upload(&init::positions(n, cfg.d, cfg.pos_base))
    });
    let mut g_mevp = be.zeros(layout.total());
    let l_mevp = objective::mevp(
        be,
        &net,
        &params,
        Some(&mut g_mevp),
        layout,
        &targets,
        &tokens,
        &pos,
        &fx.masks,
    );
    let mut g_trip = be.zeros(layout.total());
    let l_trip = objective::triplet(
        be,
        &net,
        &params,
        Some(&mut g_trip),
        layout,
        &fx.volumes,
        &fx.positives,
        fx.b,
        fx.margin,
    );
    Ours {
        encoder: targets.each_ref().map(Host::to_f64s),
        tokens: tokens.each_ref().map(Host::to_f64s),
        stages: [(l_mevp, g_mevp.to_f64s()), (l_trip, g_trip.to_f64s())],
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ||ours - torch|| / ||torch||.
fn rel(ours: &[f64], torch: &[f64], scale: f64) -> f64 {
    assert_eq!(ours.len(), torch.len());
    let diff: Vec<f64> = ours.iter().zip(torch).map(|(a, b)| a - b).collect();
    norm(&diff) / scale
}

/// The f32 backend's bound for one stage: 1e-4, or three times what PyTorch's own float32
/// run reaches against float64 on the same input when that is larger. On the fixture the
/// triplet stage's gradients carry ~1e-4 of f32 rounding in any implementation (PyTorch's
/// float32: 9.1e-5 on its worst tensor; ours 1.4e-4): 14 instance norms, the deepest over 2x2
/// maps, amplify rounding in the backward pass, and the distances ||a - p|| cancel. The f64
/// test is the one that checks the mathematics; this one checks that f32 stays at that scale.
fn f32_tolerance(stage: &Stage) -> f64 {
    1e-4f64.max(3.0 * stage.torch_f32.1)
}

/// Compares one backend's run with the fixture, printing every relative error, and returns
/// the failures (values over the bound `tol` gives for a stage; `None` is the forward pass).
fn compare(
    label: &str,
    tol: impl Fn(Option<&Stage>) -> f64,
    layout: &Layout,
    fx: &Fixture,
    ours: &Ours,
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |what: String, err: f64, tol: f64| {
        // NaN fails too.
        if err.is_nan() || err >= tol {
            bad.push(format!(
                "{label} {what}: relative error {err:.3e} >= {tol:.1e}"
            ));
        }
    };
    println!("== {label}: forward");
    for (i, p) in Plane::ALL.iter().enumerate() {
        for (what, o, t) in [
            ("encoder vectors", &ours.encoder[i], &fx.encoder[i]),
            ("[MASK] vector", &ours.tokens[i], &fx.tokens[i]),
        ] {
            let err = rel(o, t, norm(t));
            println!("{label} {:>8} {what:<16} {err:.3e}", p.name());
            check(format!("{} {what}", p.name()), err, tol(None));
        }
    }
    for (stage, (loss, grad)) in fx.stages.iter().zip(&ours.stages) {
        let stage_tol = tol(Some(stage));
        let range = layout.part_range(stage.part);
        // Nothing outside the trained part gets a gradient.
        let leaked = grad
            .iter()
            .enumerate()
            .filter(|(i, _)| !range.contains(i))
            .any(|(_, &g)| g != 0.0);
        assert!(
            !leaked,
            "{label} {}: gradient outside the trained part",
            stage.name
        );
        let stage_norm = norm(&stage.grads.values().flatten().copied().collect::<Vec<_>>());
        let loss_err = (loss - stage.loss).abs() / stage.loss.abs();
        println!(
            "== {label}: {} loss ours {loss:.15e} torch {:.15e} rel {loss_err:.3e}",
            stage.name, stage.loss
        );
        check(format!("{} loss", stage.name), loss_err, stage_tol);
        let mut worst = (0.0f64, String::new());
        for e in layout.iter().filter(|e| e.part == stage.part) {
            let t = &stage.grads[&e.name];
            let o = &grad[e.range()];
            // Some gradients vanish in exact arithmetic (the attention key bias: softmax ignores
            // a per-row shift; the encoder's fc bias in the triplet loss: it cancels in a - p and
            // a - n). Torch's value is then rounding noise, so their error is measured against
            // the whole stage's gradient norm instead.
            let (scale, note) = if norm(t) > 1e-8 * stage_norm {
                (norm(t), "")
            } else {
                (
                    stage_norm,
                    "  (zero in exact arithmetic: relative to the stage's norm)",
                )
            };
            let err = rel(o, t, scale);
            println!(
                "{label} {} {:<36} |torch| {:.3e}  rel {err:.3e}{note}",
                stage.name,
                e.name,
                norm(t)
            );
            if err > worst.0 || worst.1.is_empty() {
                worst = (err, e.name.clone());
            }
            check(
                format!("{} gradient {}", stage.name, e.name),
                err,
                stage_tol,
            );
        }
        println!(
            "== {label}: {} largest per-tensor relative error {:.3e} ({}); loss {loss_err:.3e}; \
bound {stage_tol:.1e}",
            stage.name, worst.0, worst.1
        );
        println!(
            "== (PyTorch float32 vs float64 on this input: {} loss {:.3e}, largest {:.3e})",
            stage.name, stage.torch_f32.0, stage.torch_f32.1
        );
    }
    bad
}

fn check_both_backends(path: &Path) {
    let (layout, fx) = load(path);
    let mut bad = compare("f64", |_| 1e-9, &layout, &fx, &run(&Cpu64, &layout, &fx));
    bad.extend(compare(
        "f32",
        |stage| stage.map_or(1e-4, f32_tolerance),
        &layout,
        &fx,
        &run(&Cpu, &layout, &fx),
    ));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn f64_backend_matches_torch_float64() {
    let (layout, fx) = load(Path::new(FIXTURE));
    let bad = compare("f64", |_| 1e-9, &layout, &fx, &run(&Cpu64, &layout, &fx));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn f32_backend_matches_torch_float64() {
    let (layout, fx) = load(Path::new(FIXTURE));
    let tol = |stage: Option<&Stage>| stage.map_or(1e-4, f32_tolerance);
    let bad = compare("f32", tol, &layout, &fx, &run(&Cpu, &layout, &fx));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The same comparison on a state benches/reference/parity.py wrote from one of our
/// checkpoints (path in MTX_PARITY_STATE).
#[test]
#[ignore = "needs MTX_PARITY_STATE from benches/reference/parity.py"]
fn checkpoint_state_from_parity_py() {
    let path = std::env::var("MTX_PARITY_STATE").expect("set MTX_PARITY_STATE");
    check_both_backends(Path::new(&path));
}
