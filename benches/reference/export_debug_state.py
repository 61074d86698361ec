"""Exports a tiny-preset "debug state" from the PyTorch reference (model.py): inputs, masks,
parameters, both objectives' losses and every trained tensor's gradient, all from float64
autograd, into tests/fixtures/debug_state_tiny.h5. tests/torch_parity.rs compares our Rust
model against it on every commit without torch.

    /tmp/torchvenv/bin/python benches/reference/export_debug_state.py [--checkpoint CKPT.h5]
        [--seed S] [--out tests/fixtures/debug_state_tiny.h5]

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


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="take the parameters from this tiny checkpoint instead of drawing them")
    ap.add_argument("--seed", type=int, default=20261125)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures", "debug_state_tiny.h5"))
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    if args.checkpoint:
        cfg, values = M.load_checkpoint(args.checkpoint)
        if cfg.preset != "tiny":
            raise SystemExit(f"{args.checkpoint}: preset {cfg.preset}, the fixture is for tiny")
    else:
        cfg = M.preset("tiny")
        values = draw_params(cfg, rng)
    b = 2
    volumes = draw_volumes(cfg.grid, b, rng)
    # The positive: a monotone intensity curve of the anchor, computed in f32 as the Rust
    # test reads it.
    positives = (volumes**np.float32(1.5)).astype(np.float32)
    masks = {p: np.asarray(m, dtype=np.int32) for p, m in MASKS.items()}

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    res64 = M.run_objectives(cfg, values, volumes, positives, masks, torch.float64, MARGIN)
    res32 = M.run_objectives(cfg, values, volumes, positives, masks, torch.float32, MARGIN)

    # Checks that the fixture is a fair test: every triplet row away from the hinge's kink, and
    # some rows active (else the encoder gradient would be 0).
    p64 = M.params_from_dict(cfg, values, torch.float64, trainable=())
    net = M.MedicalTransformer(cfg, p64)
    h = net.hinges(torch.as_tensor(volumes, dtype=torch.float64), torch.as_tensor(positives, dtype=torch.float64), MARGIN)
    active = int((h > 0).sum())
    print(f"triplet rows: {active} of {h.numel()} active, min |hinge| {float(h.abs().min()):.3e}")
    if active in (0, h.numel()) or float(h.abs().min()) < 1e-4:
        raise SystemExit("a triplet hinge sits too near 0 (or all rows are on one side): pick another seed")

    # For the record: how far PyTorch's own float32 run is from its float64 run.
    for stage in ("mevp", "triplet"):
        l64, g64 = res64[stage]
        l32, g32 = res32[stage]
        worst = max(g64, key=lambda n: rel(g32[n], g64[n]))
        print(
            f"{stage}: loss {l64:.12g}; torch f32 vs f64: loss {abs(l32 - l64) / abs(l64):.2e}, "
            f"worst gradient {worst} {rel(g32[worst], g64[worst]):.2e}"
        )

    with torch.no_grad():
        targets = {p: net.encode(M.plane_slices(torch.as_tensor(volumes, dtype=torch.float64), p)).numpy() for p in M.PLANES}
        tokens = {p: net.mask_token(p).numpy() for p in M.PLANES}

    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".partial"
    with h5py.File(tmp, "w", locking=False) as f:
        f.attrs["preset"] = cfg.preset
        f.attrs["margin"] = MARGIN
        f.attrs["generator"] = "benches/reference/export_debug_state.py" + (
            f" --checkpoint {args.checkpoint}" if args.checkpoint else f" --seed {args.seed}"
        )
        f.attrs["torch_version"] = str(torch.__version__)
        f.attrs["numpy_version"] = str(np.__version__)
        f.attrs["seed"] = args.seed
        f.attrs["dtype"] = "float64"
        f["input/volumes"] = volumes
        f["input/positives"] = positives
        for p in M.PLANES:
            f[f"input/masks_{p}"] = masks[p]
        for name, _, _, _ in M.layout(cfg):
            f[f"params/{name}"] = values[name].astype(np.float64)
        for stage in ("mevp", "triplet"):
            loss, grads = res64[stage]
            f[f"{stage}/loss"] = np.float64(loss)
            for name, g in grads.items():
                f[f"{stage}/grads/{name}"] = g
        # Forward intermediates, to tell an encoder mismatch from a transformer one.
        for p in M.PLANES:
            f[f"forward/encoder_{p}"] = targets[p]
            f[f"forward/mask_token_{p}"] = tokens[p]
    os.replace(tmp, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
