"""Times optimizer steps of our PyTorch reference (benches/reference/model.py) on the same
work as `mtx-hpc bench step`: paper preset, random smooth volumes, frozen-encoder MEVP,
trainable-encoder MEVP or the triplet stage, Adam on the stage's trainable part. For the side-by-side table in
docs/PERFORMANCE.md; needs torch (a separate venv, never CI).

On a GPU (--device cuda) it runs PyTorch at its best for this model: cudnn.benchmark on, TF32
for matrix products and convolutions only with --tf32 (as `mtx-hpc bench step --tf32`), the
clock read after torch.cuda.synchronize(), peak memory from the CUDA caching allocator.

Usage: bench_step.py --stage mevp|mevp-trainable|triplet [--batch 4] [--threads 2] [--steps 3]
                     [--device cpu|cuda] [--tf32]
"""
import argparse
import resource
import time

import numpy as np
import torch

import model as ref

ap = argparse.ArgumentParser()
ap.add_argument("--stage", choices=["mevp", "mevp-trainable", "triplet"], default="mevp")
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--preset", default="paper")
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ap.add_argument("--tf32", action="store_true", help="TF32 tensor cores for f32 GEMMs and convolutions (GPU)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
cuda = a.device == "cuda"
if cuda:
    # Every tensor the model makes (parameters, positions, index vectors) lands on the GPU.
    torch.set_default_device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32


def sync():
    if cuda:
        torch.cuda.synchronize()


cfg = ref.preset(a.preset)
rng = np.random.default_rng(0)
values = {}
for name, shape, part, _ in ref.layout(cfg):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    values[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
trainable = {"triplet": ("encoder",), "mevp": ("transformer",)}.get(a.stage, ("encoder", "transformer"))
params = ref.params_from_dict(cfg, values, dtype=torch.float32, trainable=trainable)
net = ref.MedicalTransformer(cfg, params)
x, y, z = cfg.grid
i, j, k = np.meshgrid(np.arange(x), np.arange(y), np.arange(z), indexing="ij")
vols = np.stack([
    (np.sin(i * 0.21 + s) * np.cos(j * 0.13) + np.sin(k * 0.17)) * 0.2 + 0.5 + 0.05 * rng.random(i.shape)
    for s in range(a.batch)
]).astype(np.float32)
volumes = torch.tensor(vols)
positives = volumes ** 1.5
masks = {}
for plane in ref.PLANES:
    n = cfg.plane_geometry(plane)[0]
    masks[plane] = np.stack([np.sort(rng.choice(n, n // 10, replace=False)) for _ in range(a.batch)])
opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=1e-4)
times = []
for step in range(a.steps + 1):
    sync()
    t = time.perf_counter()
    opt.zero_grad()
    if a.stage == "triplet":
        loss = net.triplet(volumes, positives)[0]
    else:
        loss = net.mevp(volumes, masks, trainable_encoder=a.stage == "mevp-trainable")[0]
    loss.backward()
    opt.step()
    sync()
    s = time.perf_counter() - t
    if step > 0:
        times.append(s)
    print(f"  step {step}: {s:.3f} s, loss {loss.item():.4f}{' (warm-up)' if step == 0 else ''}")
if cuda:
    peak = torch.cuda.max_memory_allocated() / 2**20
    where = f"{torch.cuda.get_device_name()}{' TF32' if a.tf32 else ''}"
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    where = f"threads {a.threads}"
print(f"torch {torch.__version__} {a.stage} batch {a.batch} {where}: "
      f"median step {sorted(times)[len(times) // 2]:.3f} s, peak memory {peak:.0f} MiB")
