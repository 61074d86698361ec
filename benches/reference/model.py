"""The Medical Transformer in PyTorch, written from our own description of it (PAPER.md and
src/model/), as an independent reference for mtx-hpc's hand-written forward/backward passes.

Autograd computes every gradient here, so agreement with the Rust model checks the Rust
backward passes as well as the forward. Everything follows the Rust code's conventions:

- volumes are [b, X, Y, Z]; planes cut as src/model/planes.rs does (axial vol[:, :, k] as
  [X, Y], sagittal vol[k, :, :] as [Y, Z], coronal vol[:, k, :] as [X, Z]);
- parameters are a dict {layout name: tensor} with the names and shapes of
  src/model/layout.rs (linear weights [out, in], convolutions [cout, cin, k, k], no conv bias);
- constants the Rust model holds as f32 (norm epsilon, sqrt(D), 1/sqrt(head width), the
  pairwise-distance epsilon, the position code) are rounded to f32 here too, even in float64:
  the f64 backend converts those same f32 values, and a float64 reference with exact
  constants would differ from it by ~1e-8 relative, hiding any real error below that level.

Needs torch, numpy and h5py (a venv outside the repository; never in CI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

PLANES = ("axial", "sagittal", "coronal")
# Tensors start at multiples of this many floats in the flat buffer (src/model/layout.rs).
ALIGN = 16
# PyTorch's pairwise_distance epsilon, as src/backend/cpu/loss.rs (an f32 constant there).
PAIRWISE_EPS = 1e-6


def f32(x: float) -> float:
    """x rounded to float32, returned as a Python float (what Rust's `T::of(x as f32)` gives)."""
    return float(np.float32(x))


@dataclass
class Config:
    """The shapes of one preset (PAPER.md, "Our presets"; src/model/config.rs)."""

    preset: str
    grid: tuple
    widths: list
    d: int
    layers: int
    heads: int
    head_width: int
    ffn: int
    norm_eps: float = 1e-5
    pos_base: float = 10000.0
    extra: dict = field(default_factory=dict)

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_width

    def plane_geometry(self, plane: str):
        """(slices, h, w) of a plane, as Plane::geometry."""
        x, y, z = self.grid
        return {"axial": (z, x, y), "sagittal": (x, y, z), "coronal": (y, x, z)}[plane]


PRESETS = {
    "paper": dict(grid=(96, 114, 96), widths=[16, 32, 64, 128], d=64, heads=4, head_width=256, ffn=128),
    "small": dict(grid=(64, 76, 64), widths=[16, 32, 64, 128], d=64, heads=4, head_width=256, ffn=128),
    "tiny": dict(grid=(32, 38, 32), widths=[8, 16, 32], d=32, heads=2, head_width=32, ffn=64),
}


def preset(name: str) -> Config:
    return Config(preset=name, layers=1, **PRESETS[name])


def config_from_toml(text: str) -> Config:
    """The model configuration a checkpoint stores in its `model_config` attribute."""
    import tomllib

    t = tomllib.loads(text)
    if t.get("joint_sequence") or t.get("dropout", 0.0) != 0.0:
        raise ValueError("the reference implements per-plane sequences without dropout only")
    return Config(
        preset=t["preset"],
        grid=tuple(t["grid"]),
        widths=list(t["widths"]),
        d=t["d"],
        layers=t["layers"],
        heads=t["heads"],
        head_width=t["head_width"],
        ffn=t["ffn"],
        norm_eps=t["norm_eps"],
        pos_base=t["pos_base"],
    )


def layout(cfg: Config):
    """[(name, shape, part, offset)] in flat-buffer order: the reverse of the forward order,
    built exactly as Layout::new, so offsets can be checked against a checkpoint's."""
    entries = []
    nxt = 0

    def push(name, shape, part):
        nonlocal nxt
        entries.append((name, tuple(shape), part, nxt))
        n = int(np.prod(shape))
        nxt = -(-(nxt + n) // ALIGN) * ALIGN

    d, aw = cfg.d, cfg.attn_width
    t = "transformer"

    def norm(p, w, part):
        push(f"{p}.gamma", [w], part)
        push(f"{p}.beta", [w], part)

    def linear(p, out, inp, part):
        push(f"{p}.weight", [out, inp], part)
        push(f"{p}.bias", [out], part)

    norm("transformer.final_ln", d, t)
    for l in range(cfg.layers, 0, -1):
        p = f"transformer.l{l}"
        linear(f"{p}.ffn.fc2", d, cfg.ffn, t)
        linear(f"{p}.ffn.fc1", cfg.ffn, d, t)
        norm(f"{p}.ln2", d, t)
        linear(f"{p}.attn.out", d, aw, t)
        for x in ("v", "k", "q"):
            linear(f"{p}.attn.{x}", aw, d, t)
        norm(f"{p}.ln1", d, t)
    push("transformer.plane_embedding", [3, d], t)
    e = "encoder"
    linear("encoder.fc", d, cfg.widths[-1], e)
    for s in range(len(cfg.widths), 0, -1):
        w = cfg.widths[s - 1]
        cin = cfg.widths[0] if s == 1 else cfg.widths[s - 2]
        for blk in (2, 1):
            p = f"encoder.s{s}.b{blk}"
            block_in = cin if blk == 1 else w
            if blk == 1 and s >= 2:
                norm(f"{p}.down.norm", w, e)
                push(f"{p}.down.conv", [w, cin, 1, 1], e)
            norm(f"{p}.norm2", w, e)
            push(f"{p}.conv2", [w, w, 3, 3], e)
            norm(f"{p}.norm1", w, e)
            push(f"{p}.conv1", [w, block_in, 3, 3], e)
    norm("encoder.stem.norm", cfg.widths[0], e)
    push("encoder.stem.conv", [cfg.widths[0], 1, 7, 7], e)
    return entries


def positions(t: int, d: int, base: float) -> np.ndarray:
    """The sinusoidal code [t, d] as init::positions computes it: angles and sin/cos in
    float64, stored as float32 (the Rust model keeps the code in f32)."""
    p = np.arange(t, dtype=np.float64)[:, None]
    j = np.arange(d)
    angle = p / np.power(base, (2 * (j // 2)).astype(np.float64) / d)
    pe = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return pe.astype(np.float32)


# ---------------------------------------------------------------- parameters


def params_from_dict(cfg: Config, values: dict, dtype=torch.float64, trainable=("encoder", "transformer")):
    """{name: tensor} leaves in `dtype` from {name: array}; checks every name and shape against
    the layout (a missing, extra or misshapen tensor is an error naming it). Tensors of the
    parts in `trainable` require gradients."""
    want = {n: (shape, part) for n, shape, part, _ in layout(cfg)}
    extra = sorted(set(values) - set(want))
    if extra:
        raise KeyError(f"tensors not in the {cfg.preset} layout: {extra}")
    out = {}
    for name, (shape, part) in want.items():
        if name not in values:
            raise KeyError(f"tensor {name} missing")
        v = np.asarray(values[name])
        if tuple(v.shape) != shape:
            raise ValueError(f"tensor {name}: shape {v.shape}, layout says {shape}")
        out[name] = torch.tensor(v, dtype=dtype).requires_grad_(part in trainable)
    return out


def load_checkpoint(path: str):
    """(Config, {name: float32 array}) from one of our checkpoints (docs/checkpoint-format.md); the
    offsets stored beside each tensor are checked against this file's layout."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        if f.attrs["format"] != "mtx-hpc-checkpoint" or int(f.attrs["format_version"]) != 1:
            raise ValueError(f"{path}: not an mtx-hpc checkpoint of format version 1")
        cfg = config_from_toml(f.attrs["model_config"])
        values = {name: ds[()] for name, ds in f["params"].items()}
        offsets = {name: int(ds.attrs["offset"]) for name, ds in f["params"].items()}
    for name, _, _, off in layout(cfg):
        if offsets.get(name) != off:
            raise ValueError(f"{path}: {name} at offset {offsets.get(name)}, our layout says {off}")
    return cfg, values


# ---------------------------------------------------------------- the network


def plane_slices(vol: torch.Tensor, plane: str) -> torch.Tensor:
    """Slices [b * n, 1, h, w] of volumes [b, X, Y, Z]; row s * n + k is slice k of subject s."""
    b = vol.shape[0]
    if plane == "axial":  # vol[:, :, k] -> [X, Y]
        s = vol.permute(0, 3, 1, 2)
    elif plane == "sagittal":  # vol[k, :, :] -> [Y, Z]
        s = vol
    elif plane == "coronal":  # vol[:, k, :] -> [X, Z]
        s = vol.permute(0, 2, 1, 3)
    else:
        raise ValueError(plane)
    n, h, w = s.shape[1:]
    return s.reshape(b * n, 1, h, w)


def instance_norm(x, gamma, beta, eps):
    """Per (sample, channel) over the spatial values, biased variance, learnable affine."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma[None, :, None, None] + beta[None, :, None, None]


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


class MedicalTransformer:
    """The model as functions of a parameter dict (no nn.Module: the names are the layout's)."""

    def __init__(self, cfg: Config, params: dict):
        self.cfg = cfg
        self.p = params
        self.dtype = next(iter(params.values())).dtype
        self.eps = f32(cfg.norm_eps)

    def _conv_norm(self, x, conv, norm, stride, pad, relu):
        y = F.conv2d(x, self.p[conv], stride=stride, padding=pad)
        y = instance_norm(y, self.p[f"{norm}.gamma"], self.p[f"{norm}.beta"], self.eps)
        return F.relu(y) if relu else y

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Slices [n, 1, h, w] -> vectors [n, D]: ResNet-18 layout, instance norm, no conv bias."""
        h = self._conv_norm(x, "encoder.stem.conv", "encoder.stem.norm", 2, 3, True)
        # max_pool2d pads with -inf, i.e. ignores the border, as the Rust pool does.
        h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)
        cin = self.cfg.widths[0]
        for s, w in enumerate(self.cfg.widths, start=1):
            for b in (1, 2):
                stride = 2 if (s >= 2 and b == 1) else 1
                p = f"encoder.s{s}.b{b}"
                y = self._conv_norm(h, f"{p}.conv1", f"{p}.norm1", stride, 1, True)
                y = self._conv_norm(y, f"{p}.conv2", f"{p}.norm2", 1, 1, False)
                if stride != 1 or cin != w:
                    skip = self._conv_norm(h, f"{p}.down.conv", f"{p}.down.norm", stride, 0, False)
                else:
                    skip = h
                h = F.relu(y + skip)
                cin = w
        feat = h.mean(dim=(2, 3))
        return feat @ self.p["encoder.fc.weight"].T + self.p["encoder.fc.bias"]

    def _linear(self, x, name):
        return x @ self.p[f"{name}.weight"].T + self.p[f"{name}.bias"]

    def attention(self, x, prefix):
        """Multi-head self-attention by hand: D -> heads x head_width for q, k and v, softmax of
        q k^T / sqrt(head_width) per head, heads concatenated, projected back to D."""
        b, t, _ = x.shape
        hh, dh = self.cfg.heads, self.cfg.head_width

        def split(y):  # [b, t, heads * dh] -> [b, heads, t, dh]; head j owns columns j*dh..
            return y.reshape(b, t, hh, dh).permute(0, 2, 1, 3)

        q, k, v = (split(self._linear(x, f"{prefix}.{n}")) for n in ("q", "k", "v"))
        # 1 / sqrt(dh) evaluated in f32 as the Rust model does.
        scale = float(np.float32(1.0) / np.sqrt(np.float32(dh)))
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        att = (probs @ v).permute(0, 2, 1, 3).reshape(b, t, hh * dh)
        return self._linear(att, f"{prefix}.out")

    def transform(self, vectors: torch.Tensor, plane: int) -> torch.Tensor:
        """Sequences [b, t, D] of one plane -> final-LN output [b, t, D]."""
        cfg = self.cfg
        t = vectors.shape[1]
        pos = torch.tensor(positions(t, cfg.d, cfg.pos_base), dtype=self.dtype)
        h = vectors * f32(math.sqrt(cfg.d)) + pos + self.p["transformer.plane_embedding"][plane]
        for l in range(1, cfg.layers + 1):
            p = f"transformer.l{l}"
            n1 = layer_norm(h, self.p[f"{p}.ln1.gamma"], self.p[f"{p}.ln1.beta"], self.eps)
            h = h + self.attention(n1, f"{p}.attn")
            n2 = layer_norm(h, self.p[f"{p}.ln2.gamma"], self.p[f"{p}.ln2.beta"], self.eps)
            h = h + self._linear(F.relu(self._linear(n2, f"{p}.ffn.fc1")), f"{p}.ffn.fc2")
        return layer_norm(h, self.p["transformer.final_ln.gamma"], self.p["transformer.final_ln.beta"], self.eps)

    # ------------------------------------------------------------ objectives

    def mask_token(self, plane: str) -> torch.Tensor:
        """[MASK]: the encoder's vector of a constant -1 slice of that plane's size."""
        _, h, w = self.cfg.plane_geometry(plane)
        return self.encode(-torch.ones(1, 1, h, w, dtype=self.dtype))[0]

    def mevp(self, volumes: torch.Tensor, masks: dict, trainable_encoder: bool = False):
        """MEVP with the encoder frozen: per plane, the mean over masked rows (all subjects) and
        D of (final-LN output - target)^2, summed over the planes. `masks[plane]` is an int
        array [b, k] of slice positions. Returns (loss, {plane: loss}).
        `trainable_encoder`: the input vectors and the [MASK] vector keep their autograd
        graph into the encoder; the targets are the same vectors detached."""
        b = volumes.shape[0]
        total, per = 0.0, {}
        for pi, plane in enumerate(PLANES):
            n = self.cfg.plane_geometry(plane)[0]
            if trainable_encoder:
                vectors = self.encode(plane_slices(volumes, plane)).reshape(b, n, self.cfg.d)
                targets = vectors.detach()
                token = self.mask_token(plane)
            else:
                with torch.no_grad():  # targets and tokens are constants: the encoder is frozen
                    targets = self.encode(plane_slices(volumes, plane)).reshape(b, n, self.cfg.d)
                    token = self.mask_token(plane)
                vectors = targets
            m = torch.as_tensor(np.asarray(masks[plane]), dtype=torch.long)
            rows = (torch.arange(b)[:, None] * n + m).reshape(-1)
            x = vectors.reshape(b * n, -1).clone()
            x[rows] = token
            out = self.transform(x.reshape(b, n, -1), pi).reshape(b * n, -1)
            loss = ((out[rows] - targets.reshape(b * n, -1)[rows]) ** 2).mean()
            per[plane] = loss
            total = total + loss
        return total, per

    def triplet(self, anchors: torch.Tensor, positives: torch.Tensor, margin: float = 1.0):
        """Triplet loss of the encoder: per plane, anchors A = encoder(slices), positives from the
        positive volumes, negatives the A rows of the paired subject (s <-> s^1, same slice);
        mean over rows of relu(||a - p + eps|| - ||a - n + eps|| + margin), summed over the
        planes. Returns (loss, {plane: loss})."""
        b = anchors.shape[0]
        assert b % 2 == 0, "triplet batches pair subjects: b must be even"
        eps = f32(PAIRWISE_EPS)
        total, per = 0.0, {}
        for plane in PLANES:
            n = self.cfg.plane_geometry(plane)[0]
            a = self.encode(plane_slices(anchors, plane))
            p = self.encode(plane_slices(positives, plane))
            pair = torch.tensor([((r // n) ^ 1) * n + r % n for r in range(b * n)])
            neg = a[pair]
            d_ap = ((a - p + eps) ** 2).sum(-1).sqrt()
            d_an = ((a - neg + eps) ** 2).sum(-1).sqrt()
            # Rows whose anchor or negative slice is all background count 0 (as in
            # src/model/objective.rs: their gradient is instance-norm-amplified noise).
            s = plane_slices(anchors, plane)
            flat = (s.flatten(1).amax(1) == s.flatten(1).amin(1))
            keep = (~flat & ~flat[pair]).to(a.dtype)
            # relu, not clamp: its gradient at exactly 0 is 0, as the Rust hinge's.
            loss = (F.relu(d_ap - d_an + f32(margin)) * keep).mean()
            per[plane] = loss
            total = total + loss
        return total, per

    def hinges(self, anchors, positives, margin: float = 1.0):
        """Every row's hinge argument (for checking that none sits at the kink)."""
        b = anchors.shape[0]
        eps = f32(PAIRWISE_EPS)
        out = []
        with torch.no_grad():
            for plane in PLANES:
                n = self.cfg.plane_geometry(plane)[0]
                a = self.encode(plane_slices(anchors, plane))
                p = self.encode(plane_slices(positives, plane))
                pair = torch.tensor([((r // n) ^ 1) * n + r % n for r in range(b * n)])
                d_ap = ((a - p + eps) ** 2).sum(-1).sqrt()
                d_an = ((a - a[pair] + eps) ** 2).sum(-1).sqrt()
                out.append(d_ap - d_an + f32(margin))
        return torch.cat(out)


def run_objectives(cfg: Config, values: dict, volumes, positives, masks, dtype, margin: float = 1.0):
    """Both objectives with gradients in `dtype`. volumes/positives: float arrays
    [b, X, Y, Z]; masks: {plane: int [b, k]}. Returns {"mevp": (loss, {name: grad}),
    "triplet": (loss, {name: grad})} as float64 numpy, gradients only for the trained part
    (MEVP: transformer; triplet: encoder)."""
    res = {}
    for stage, part in (("mevp", "transformer"), ("triplet", "encoder")):
        params = params_from_dict(cfg, values, dtype, trainable=(part,))
        m = MedicalTransformer(cfg, params)
        vol = torch.as_tensor(np.asarray(volumes), dtype=dtype)
        if stage == "mevp":
            loss, _ = m.mevp(vol, masks)
        else:
            loss, _ = m.triplet(vol, torch.as_tensor(np.asarray(positives), dtype=dtype), margin)
        loss.backward()
        grads = {}
        for name, t in params.items():
            if t.requires_grad:
                g = t.grad if t.grad is not None else torch.zeros_like(t)
                grads[name] = g.detach().double().numpy()
        res[stage] = (float(loss.detach()), grads)
    return res
