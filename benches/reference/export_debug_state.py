"""Exports a tiny-preset "debug state" from the PyTorch reference (model.py): inputs, masks,
parameters, both objectives' losses and every trained tensor's gradient, all from float64
autograd, into tests/fixtures/debug_state_tiny.h5. tests/torch_parity.rs compares our Rust
model against it on every commit without torch.

    /tmp/torchvenv/bin/python benches/reference/export_debug_state.py [--seed S]
        [--out tests/fixtures/debug_state_tiny.h5]

(benches/reference/parity.py writes the same kind of file from one of our checkpoints.)

Inputs are float32 values (our model reads volumes as f32) and parameters float32-representable
values stored as float64, so the Rust f64 backend sees exactly the numbers torch saw and the
f32 backend loses nothing when it converts them.
"""

from __future__ import annotations

import argparse
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as M  # noqa: E402

# Not the paper's 1.0: with these draws every row's hinge would be active at margin 1, and the
# fixture would never check that inactive rows give no gradient. At 0.25 about half are active.
MARGIN = 0.25
# Three masked positions per plane per subject, listed explicitly (sorted, as the Rust masks
# are); different per subject, first and last positions included to reach the sequence ends.
MASKS = {
    "axial": [[0, 13, 27], [4, 20, 31]],
    "sagittal": [[2, 16, 30], [7, 8, 25]],
    "coronal": [[5, 19, 37], [0, 11, 33]],
}


def draw_params(cfg: M.Config, rng: np.random.Generator) -> dict:
    """Random parameters, float32-representable. Unlike our init, norm gains and shifts,
    biases and the plane embedding are all away from 0 and 1, so their gradients are exercised
    at values where a wrong formula shows."""
    out = {}
    for name, shape, _, _ in M.layout(cfg):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        if name.endswith(".gamma"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".beta"):
            v = 0.2 * rng.standard_normal(shape)
        elif name == "transformer.plane_embedding":
            v = 0.3 * rng.standard_normal(shape)
        elif len(shape) == 4:  # convolution: Kaiming normal for ReLU
            fan_in = shape[1] * shape[2] * shape[3]
            v = np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
        elif name.endswith(".weight"):
            v = rng.uniform(-1, 1, shape) / np.sqrt(shape[1])
        elif name.endswith(".bias"):
            v = 0.2 * rng.uniform(-1, 1, shape)
        else:
            raise ValueError(name)
        out[name] = v.astype(np.float32)
    return out


def draw_volumes(grid, b: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth volumes in [0, 1] (a few random low-frequency waves and a blob per subject) plus
    a little noise, so values carry no ties and max-pool windows have clear maxima."""
    x, y, z = (np.arange(n, dtype=np.float64) / n for n in grid)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    vols = []
    for _ in range(b):
        v = np.zeros(grid)
        for _ in range(4):
            f = rng.uniform(0.5, 3.0, 3)
            ph = rng.uniform(0, 2 * np.pi, 3)
            v += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * f[0] * X + ph[0]) * np.cos(
                2 * np.pi * f[1] * Y + ph[1]
            ) * np.sin(2 * np.pi * f[2] * Z + ph[2])
        c = rng.uniform(0.3, 0.7, 3)
        v += 2.0 * np.exp(-((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2) / 0.05)
        v += 0.05 * rng.standard_normal(grid)
        v = (v - v.min()) / (v.max() - v.min())
        vols.append(v)
    return np.stack(vols).astype(np.float32)


def rel(ours, ref, scale=None) -> float:
    """||ours - ref|| / ||ref|| (or / scale)."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - b) / (scale if scale is not None else max(np.linalg.norm(b), 1e-300)))


def grad_errors(ours: dict, ref: dict) -> dict:
    """Per-tensor relative error as tests/torch_parity.rs measures it: a tensor whose reference
    gradient vanishes in exact arithmetic (|g| <= 1e-8 of the stage's gradient norm: the
    attention key bias, the encoder fc bias under the triplet loss) is measured against the
    stage's norm instead of its own rounding noise."""
    total = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in ref.values())))
    out = {}
    for name, g in ref.items():
        n = float(np.linalg.norm(g))
        out[name] = rel(ours[name], g, n if n > 1e-8 * total else total)
    return out


def random_masks(cfg: M.Config, b: int, rng: np.random.Generator) -> dict:
    """floor(0.1 x slices) sorted positions per plane and subject (PAPER.md)."""
    out = {}
    for p in M.PLANES:
        n = cfg.plane_geometry(p)[0]
        k = max(1, int(0.1 * n + 1e-9))
        out[p] = np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(b)]).astype(np.int32)
    return out


def export(cfg, values, volumes, positives, masks, margin, out, generator, strict=True, model_config=None):
    """Runs both objectives in float64 (the stored truth) and float32 (for the record), checks
    the triplet hinges, writes the debug state to `out` and returns the float32 errors
    {stage: (loss error, {name: gradient error})}."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    res64 = M.run_objectives(cfg, values, volumes, positives, masks, torch.float64, margin)
    res32 = M.run_objectives(cfg, values, volumes, positives, masks, torch.float32, margin)

    # A fair test has every triplet row away from the hinge's kink (else rounding decides
    # whether it contributes) and rows on both sides of it.
    p64 = M.params_from_dict(cfg, values, torch.float64, trainable=())
    net = M.MedicalTransformer(cfg, p64)
    vol64 = torch.as_tensor(volumes, dtype=torch.float64)
    h = net.hinges(vol64, torch.as_tensor(positives, dtype=torch.float64), margin)
    active = int((h > 0).sum())
    print(f"triplet rows: {active} of {h.numel()} active, min |hinge| {float(h.abs().min()):.3e}")
    if float(h.abs().min()) < 1e-4 or (strict and active in (0, h.numel())):
        msg = "a triplet hinge sits within 1e-4 of 0 (or all rows are on one side)"
        if strict:
            raise SystemExit(msg + ": pick another seed")
        print("warning: " + msg)

    f32_errors = {}
    for stage in ("mevp", "triplet"):
        l64, g64 = res64[stage]
        l32, g32 = res32[stage]
        errs = grad_errors(g32, g64)
        worst = max(errs, key=errs.get)
        lerr = abs(l32 - l64) / abs(l64)
        f32_errors[stage] = (lerr, errs)
        print(
            f"{stage}: loss {l64:.12g}; torch float32 vs float64: loss {lerr:.2e}, "
            f"largest per-tensor gradient error {errs[worst]:.2e} ({worst})"
        )

    with torch.no_grad():
        targets = {p: net.encode(M.plane_slices(vol64, p)).numpy() for p in M.PLANES}
        tokens = {p: net.mask_token(p).numpy() for p in M.PLANES}

    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".partial"
    with h5py.File(tmp, "w", locking=False) as f:
        f.attrs["preset"] = cfg.preset
        f.attrs["margin"] = float(margin)
        f.attrs["generator"] = generator
        f.attrs["torch_version"] = str(torch.__version__)
        f.attrs["numpy_version"] = str(np.__version__)
        f.attrs["dtype"] = "float64"
        if model_config is not None:
            f.attrs["model_config"] = model_config
        f["input/volumes"] = volumes
        f["input/positives"] = positives
        for p in M.PLANES:
            f[f"input/masks_{p}"] = masks[p]
        for name, _, _, _ in M.layout(cfg):
            f[f"params/{name}"] = np.asarray(values[name]).astype(np.float64)
        for stage in ("mevp", "triplet"):
            loss, grads = res64[stage]
            f[f"{stage}/loss"] = np.float64(loss)
            for name, g in grads.items():
                f[f"{stage}/grads/{name}"] = g
            # PyTorch's own float32 run against its float64 run: the scale of f32 rounding
            # for this input, printed beside ours by the Rust test.
            lerr, errs = f32_errors[stage]
            f[stage].attrs["torch_float32_loss_rel"] = lerr
            f[stage].attrs["torch_float32_largest_grad_rel"] = max(errs.values())
        # Forward intermediates, to tell an encoder mismatch from a transformer one.
        for p in M.PLANES:
            f[f"forward/encoder_{p}"] = targets[p]
            f[f"forward/mask_token_{p}"] = tokens[p]
    os.replace(tmp, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return f32_errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=20261125)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures", "debug_state_tiny.h5"))
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    cfg = M.preset("tiny")
    values = draw_params(cfg, rng)
    volumes = draw_volumes(cfg.grid, 2, rng)
    # The positive: a monotone intensity curve of the anchor, computed in f32 as the Rust
    # test reads it.
    positives = (volumes ** np.float32(1.5)).astype(np.float32)
    masks = {p: np.asarray(m, dtype=np.int32) for p, m in MASKS.items()}
    export(cfg, values, volumes, positives, masks, MARGIN, args.out,
           f"benches/reference/export_debug_state.py --seed {args.seed}")


if __name__ == "__main__":
    main()
