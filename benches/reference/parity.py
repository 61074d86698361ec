"""PyTorch parity for one of OUR checkpoints: loads its parameters with h5py (any preset), draws
an input (two smooth volumes, their positives volume**1.5, MEVP masks of floor(0.1 x slices)
positions), runs both objectives with PyTorch in float64 and float32, writes the result as a
debug-state file (the format of tests/fixtures/debug_state_tiny.h5) and then runs our model on
the same file through tests/torch_parity.rs, which prints ||ours - torch|| / ||torch|| for the
forward vectors, both losses and every gradient, on our f64 and f32 CPU backends.

    /tmp/torchvenv/bin/python benches/reference/parity.py --checkpoint RUN/final.h5 \\
        [--state /tmp/parity_state.h5] [--margin 1.0] [--seed 1] [--no-cargo]

Torch lives in a venv outside the repository; our side is plain `cargo test` (the ignored test
`checkpoint_state_from_parity_py`, given the file in MTX_PARITY_STATE).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_debug_state as E  # noqa: E402
import model as M  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an mtx-hpc checkpoint (e.g. RUN_DIR/final.h5)")
    ap.add_argument("--state", default="/tmp/mtx_parity_state.h5", help="where to write the debug state")
    ap.add_argument("--margin", type=float, default=1.0, help="triplet margin (the paper's 1.0)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the volumes and masks")
    ap.add_argument("--no-cargo", action="store_true", help="only write the state and print torch's numbers")
    args = ap.parse_args()

    cfg, values = M.load_checkpoint(args.checkpoint)
    with h5py.File(args.checkpoint, "r", locking=False) as f:
        model_config = str(f.attrs["model_config"])
        step, stage = int(f.attrs["step"]), str(f.attrs["stage"])
    print(f"{args.checkpoint}: preset {cfg.preset}, {stage} step {step}")
    rng = np.random.default_rng(args.seed)
    volumes = E.draw_volumes(cfg.grid, 2, rng)
    positives = (volumes ** np.float32(1.5)).astype(np.float32)
    masks = E.random_masks(cfg, 2, rng)
    # A trained encoder may put a hinge near its kink; that is reported, not refused.
    E.export(
        cfg, values, volumes, positives, masks, args.margin, args.state,
        f"benches/reference/parity.py --checkpoint {args.checkpoint} --seed {args.seed}",
        strict=False, model_config=model_config,
    )
    if args.no_cargo:
        return
    cmd = ["cargo", "test", "--test", "torch_parity", "--", "--ignored", "--nocapture", "checkpoint_state_from_parity_py"]
    print("$ MTX_PARITY_STATE=" + args.state + " " + " ".join(cmd), flush=True)
    env = dict(os.environ, MTX_PARITY_STATE=os.path.abspath(args.state))
    sys.exit(subprocess.call(cmd, cwd=REPO, env=env))


if __name__ == "__main__":
    main()
