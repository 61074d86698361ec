"""The preprocessing steps of `mtx-hpc pack` done with nibabel + scipy: the reference the
orientation test compares against, and the baseline of the preprocessing benchmark.

    python preprocess_nibabel.py bench FILE...          median seconds per file (one core)
    python preprocess_nibabel.py reference IN OUT.f32   write the packed volume, [x][y][z] C order
    python preprocess_nibabel.py make-synth OUT.nii.gz  int16 256^3, scale slope, stored LIA

Steps: load, canonical orientation (as_closest_canonical), anti-aliasing Gaussian
(sigma = (factor - 1) / 2 voxels per axis when downsampling) + linear zoom to 2 mm, crop/pad to
96 x 114 x 96 centred on the foreground's centre of mass (threshold 10% of the way from the 2nd
to the 98th percentile, as ours), clip to the 0.5-99.5 foreground percentiles, scale to [0, 1].
"""
import os
import statistics
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

SPACING = 2.0
GRID = (96, 114, 96)


def prepare(path, spacing=SPACING, grid=GRID, antialias=True):
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.array(img.header.get_zooms()[:3], dtype=np.float64)
    factor = spacing / zooms
    sigma = np.where(factor > 1.0, (factor - 1.0) / 2.0, 0.0)
    if antialias and np.any(sigma > 0):
        data = ndimage.gaussian_filter(data, sigma, mode="constant")
    data = ndimage.zoom(data, 1.0 / factor, order=1, mode="constant", grid_mode=False)
    sample = data[::2, ::2, ::2]
    p2, p98 = np.percentile(sample, [2, 98])
    threshold = p2 + 0.1 * (p98 - p2)
    com = np.array(ndimage.center_of_mass(data > threshold))
    out = np.zeros(grid, np.float32)
    start = np.round(com - (np.array(grid) - 1) / 2.0).astype(int)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.array(grid), data.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = data[
        src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]
    ]
    fg = out[out > threshold]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def make_synth(path, n=256, seed=0):
    """A head-like int16 volume with noise (so gzip sees MRI-like entropy), slope 0.25."""
    rng = np.random.default_rng(seed)
    ijk = np.indices((n, n, n), dtype=np.float32) - (n - 1) / 2.0
    r = np.sqrt((ijk[0] / 90.0) ** 2 + (ijk[1] / 110.0) ** 2 + (ijk[2] / 80.0) ** 2)
    vol = np.where(r < 1.0, 600.0, 40.0)
    vol = np.where(r < 0.85, 900.0 - 300.0 * (r < 0.3), vol)
    vol = vol + 30.0 * rng.standard_normal((n, n, n))
    raw = np.clip(vol / 0.25, -32768, 32767).astype(np.int16)
    # stored LIA: voxel axis 0 -> left, 1 -> inferior, 2 -> anterior, 1 mm
    aff = np.array([[-1.0, 0, 0, 128.0], [0, 0, 1.0, -128.0], [0, -1.0, 0, 128.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(raw, aff)
    img.header.set_data_dtype(np.int16)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    tmp = path + ".tmp.nii"
    nib.save(img, tmp)
    import gzip
    import struct

    with open(tmp, "r+b") as f:  # nibabel resets scaling when saving raw ints: set it after
        f.seek(112)
        f.write(struct.pack("<ff", 0.25, 0.0))
    with open(tmp, "rb") as f, gzip.open(path, "wb", compresslevel=6) as g:
        g.write(f.read())
    os.remove(tmp)


def bench(files, runs=7):
    """Median seconds per file, with the anti-aliasing Gaussian (the same steps as ours) and
    without it (plain linear zoom, aliasing when downsampling: a lower bound)."""
    for antialias, label in ((True, "anti-aliased"), (False, "plain zoom")):
        for f in files:
            prepare(f, antialias=antialias)  # warm the page cache and imports
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                prepare(f, antialias=antialias)
                times.append(time.perf_counter() - t0)
            name = os.path.basename(f)
            print(f"nibabel+scipy  {name:<28} median {statistics.median(times):.4f} s  (min {min(times):.4f}, {runs} runs; {label})")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "bench":
        bench(sys.argv[2:])
    elif cmd == "reference":
        prepare(sys.argv[2]).astype("<f4").tofile(sys.argv[3])
    elif cmd == "make-synth":
        make_synth(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
