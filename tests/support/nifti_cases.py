"""Writes the NIfTI files the preprocessing tests read, with nibabel (the reference reader).

    python nifti_cases.py orient OUTDIR    marker volumes in many orientations + cases.json
    python nifti_cases.py ramp OUTDIR      a linear ramp in world x on an oblique grid
    python nifti_cases.py labels OUTDIR    image + BraTS-like label map, one 1-voxel label
    python nifti_cases.py grid OUTDIR      a volume already on the 2 mm world grid
    python nifti_cases.py bad OUTDIR       broken files for the error messages
    python nifti_cases.py reorient IN CODES OUT   IN rewritten in another voxel orientation

Each case samples a function of world coordinates through its own affine, so the expected
world position of every feature is known whatever the voxel order.
"""
import gzip
import json
import os
import struct
import sys

import nibabel as nib
import numpy as np

# An ellipsoid "head" with a gentle gradient, and bright 5 mm marker cubes outside it at
# asymmetric positions, so any flip or swap moves them far from where they belong.
HEAD_CENTRE = np.array([5.0, -10.0, 8.0])
HEAD_RADII = np.array([45.0, 55.0, 40.0])
MARKERS = [[62.0, -10.0, 8.0], [5.0, 58.0, 0.0], [-10.0, -20.0, 54.0], [-40.0, -62.0, -20.0]]
WORLD_LO = np.array([-62.0, -80.0, -48.0])
WORLD_HI = np.array([74.0, 72.0, 64.0])


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid_for(block, lo=WORLD_LO, hi=WORLD_HI):
    """Affine (voxel axes = columns of `block`) and shape whose field of view covers lo..hi."""
    inv = np.linalg.inv(block)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    v = corners @ inv.T
    vmin, vmax = v.min(0), v.max(0)
    shape = tuple(int(np.ceil(b - a)) + 1 for a, b in zip(vmin, vmax))
    aff = np.eye(4)
    aff[:3, :3] = block
    aff[:3, 3] = block @ vmin
    return aff, shape


def world_coords(aff, shape):
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = aff[:3, :3] @ ijk + aff[:3, 3:4]
    return xyz.reshape((3,) + shape)


def head_and_markers(xyz):
    d = (xyz - HEAD_CENTRE[:, None, None, None]) / HEAD_RADII[:, None, None, None]
    inside = (d**2).sum(0) <= 1.0
    vol = np.where(inside, 100.0 + 0.2 * xyz[0] + 0.1 * xyz[1], 0.0)
    for m in MARKERS:
        cube = np.all(np.abs(xyz - np.array(m)[:, None, None, None]) <= 2.5, axis=0)
        vol[cube] = 400.0
    return vol


def save(img, path):
    nib.save(img, path)


def orient(out):
    deg = np.pi / 180
    cases = {
        "ras": (np.diag([1.0, 1.0, 1.0]), "sform"),
        "lps": (np.diag([-1.0, -1.0, 1.0]), "sform"),
        "las": (np.diag([-1.0, 1.0, 1.0]), "sform"),
        # voxel axes point P, I, R: a permutation with flips
        "pir": (np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]]), "sform"),
        "oblique": (rotation(12 * deg, -8 * deg, 20 * deg) @ np.diag([1.1, 1.1, 1.1]), "sform"),
        "aniso": (np.diag([-0.9, 1.5, 1.2]), "sform"),
        "qform_only": (rotation(0, 0, 90 * deg) @ np.diag([1.2, 1.0, 1.0]), "qform"),
        "sform_only": (np.array([[0, -1.0, 0], [0, 0, 1.0], [1.0, 0, 0]]), "sform"),
        "sform_over_qform": (np.diag([1.0, -1.0, -1.0]), "sform"),
        "no_codes": (np.diag([1.0, 1.0, 1.0]), "voxel_sizes"),
    }
    meta = {}
    for name, (block, source) in cases.items():
        aff, shape = grid_for(block)
        if name == "no_codes":
            aff[:3, 3] = 0.0  # what a reader without codes assumes: voxel sizes alone
            # shift the content so it still lies inside 0..shape in world mm
            vol = head_and_markers(world_coords(aff, shape) + WORLD_LO[:, None, None, None])
            expect_shift = -WORLD_LO
        else:
            vol = head_and_markers(world_coords(aff, shape))
            expect_shift = np.zeros(3)
        data = vol.astype(np.float32)
        if name == "lps":
            # int16 with a scale slope, as scanners write
            data = np.round((vol - 10.0) / 0.5).astype(np.int16)
        img = nib.Nifti1Image(data, aff)
        h = img.header
        wrong = np.diag([-1.0, -1.0, -1.0, 1.0])
        if source == "qform":
            img.set_qform(aff, code=1)
            img.set_sform(wrong, code=0)  # present but must be ignored
        elif source == "voxel_sizes":
            img.set_qform(wrong, code=0)
            img.set_sform(wrong, code=0)
        elif name == "sform_only":
            img.set_sform(aff, code=2)
            img.set_qform(None, code=0)
        elif name == "sform_over_qform":
            img.set_sform(aff, code=2)
            img.set_qform(wrong, code=1)  # a valid qform the sform must win over
        else:
            img.set_sform(aff, code=1)
            img.set_qform(aff, code=1)
        path = os.path.join(out, f"{name}.nii.gz")
        if name == "lps":
            raw = os.path.join(out, "lps_raw.nii")
            save(img, raw)
            with open(raw, "r+b") as f:  # nibabel recomputes scaling on save: set it after
                f.seek(112)
                f.write(struct.pack("<ff", 0.5, 10.0))
            with open(raw, "rb") as f, gzip.open(path, "wb") as g:
                g.write(f.read())
            os.remove(raw)
        else:
            save(img, path)
        back = nib.load(path)
        # Without codes nibabel invents an Analyze-style LAS affine; we follow NIfTI's
        # "method 1" (voxel sizes alone, axes R, A, S), so that is what we expect.
        expected = back.affine if source != "voxel_sizes" else np.diag(list(h.get_zooms()[:3]) + [1.0])
        meta[name] = {
            "file": path,
            "affine": expected.tolist(),
            "source": source,
            "axcodes": "".join(nib.aff2axcodes(expected)),
            "markers": [list(np.array(m) + expect_shift) for m in MARKERS],
            "probe_voxel": [int(s // 2) for s in shape],
            # nibabel applies scl_slope/scl_inter: the value our reader must return
            "probe_value": float(back.dataobj[tuple(int(s // 2) for s in shape)]),
        }
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f)


def ramp(out):
    deg = np.pi / 180
    block = rotation(10 * deg, 5 * deg, -15 * deg)
    aff, shape = grid_for(block, np.array([-70.0, -70.0, -60.0]), np.array([70.0, 70.0, 60.0]))
    xyz = world_coords(aff, shape)
    inside = np.all(np.abs(xyz) <= np.array([60.0, 60.0, 50.0])[:, None, None, None], axis=0)
    vol = np.where(inside, 100.0 + xyz[0], 0.0).astype(np.float32)
    save(nib.Nifti1Image(vol, aff), os.path.join(out, "ramp.nii.gz"))


def labels(out):
    aff, shape = grid_for(np.eye(3), np.array([-40.0, -40.0, -40.0]), np.array([40.0, 40.0, 40.0]))
    xyz = world_coords(aff, shape)
    r = np.sqrt((xyz**2).sum(0))
    img = np.where(r < 35, 100.0 + 0.3 * xyz[0], 0.0).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[r < 12] = 2
    lab[r < 6] = 1
    lab[(r >= 6) & (r < 8)] = 4
    # one voxel of label 4 on its own, at world (20, -15, 10)
    one = tuple(int(round(v)) for v in np.linalg.inv(aff) @ np.array([20.0, -15.0, 10.0, 1.0]))[:3]
    lab[one] = 4
    nib.save(nib.Nifti1Image(img, aff), os.path.join(out, "image.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), os.path.join(out, "labels.nii.gz"))
    # a label map on a shifted grid, and one of another shape
    shifted = aff.copy()
    shifted[0, 3] += 1.0
    nib.save(nib.Nifti1Image(lab, shifted), os.path.join(out, "labels_shifted.nii.gz"))
    nib.save(nib.Nifti1Image(lab[:-1], aff), os.path.join(out, "labels_shape.nii.gz"))
    nib.save(nib.Nifti1Image(lab.astype(np.float32) + 0.5, aff), os.path.join(out, "labels_fraction.nii.gz"))


def grid(out):
    # Exactly the --align world grid at 2 mm (96 x 114 x 96 centred on (0, -18, 18)), so that
    # resampling is the identity and normalisation can be checked against numpy directly.
    shape = (96, 114, 96)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = np.array([0.0, -18.0, 18.0]) - 2.0 * (np.array(shape) - 1) / 2.0
    rng = np.random.default_rng(3)
    xyz = world_coords(aff, shape)
    d = (xyz - np.array([0.0, -18.0, 18.0])[:, None, None, None]) / np.array([70.0, 90.0, 70.0])[:, None, None, None]
    inside = (d**2).sum(0) <= 1.0
    vol = np.where(inside, 200.0 + 40.0 * rng.standard_normal(shape) + 0.5 * xyz[2], 0.0)
    vol = np.maximum(vol, 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, aff), os.path.join(out, "grid.nii.gz"))
    vol.transpose(0, 1, 2).astype("<f4").tofile(os.path.join(out, "grid.f32"))  # C order [x][y][z]


def bad(out):
    aff = np.eye(4)
    vol = np.zeros((20, 20, 20), np.float32)
    vol[5:15, 5:15, 5:15] = 100.0
    good = os.path.join(out, "good.nii.gz")
    nib.save(nib.Nifti1Image(vol, aff), good)
    with open(good, "rb") as f:
        blob = f.read()
    with open(os.path.join(out, "truncated.nii.gz"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    nib.save(nib.Nifti1Image(vol, aff), os.path.join(out, "good.nii"))
    with open(os.path.join(out, "good.nii"), "rb") as f:
        raw = f.read()
    with open(os.path.join(out, "truncated_data.nii"), "wb") as f:
        f.write(raw[: len(raw) - 1000])
    with open(os.path.join(out, "text.nii.gz"), "w") as f:
        f.write("subject_id,image\nsub1,a.nii.gz\n" * 30)
    with gzip.open(os.path.join(out, "random.nii.gz"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    four = np.stack([vol * (k + 1) for k in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(four, aff), os.path.join(out, "four_d.nii.gz"))

    def patched(name, offset, fmt, *values):
        b = bytearray(raw)
        struct.pack_into(fmt, b, offset, *values)
        with gzip.open(os.path.join(out, name), "wb") as f:
            f.write(bytes(b))

    patched("zero_voxel.nii.gz", 76 + 4 * 2, "<f", 0.0)
    patched("negative_voxel.nii.gz", 76 + 4 * 1, "<f", -1.0)
    patched("nan_voxel.nii.gz", 76 + 4 * 3, "<f", float("nan"))
    sing = aff.copy()
    sing[:, 2] = 0.0
    img = nib.Nifti1Image(vol, aff)
    img.set_sform(sing, code=1)
    nib.save(img, os.path.join(out, "singular.nii.gz"))
    nan = vol.copy()
    nan[1, 2, 3] = np.nan
    nan[4, 5, 6] = np.nan
    nan[7, 8, 9] = np.inf
    nib.save(nib.Nifti1Image(nan, aff), os.path.join(out, "nan_voxels.nii.gz"))
    nib.save(nib.Nifti1Image(vol.astype(np.complex64), aff), os.path.join(out, "complex.nii.gz"))
    # big-endian int16: the same values as good.nii.gz
    be = nib.Nifti1Image(vol.astype(">i2"), aff, header=nib.Nifti1Header(endianness=">"))
    nib.save(be, os.path.join(out, "big_endian.nii.gz"))
    assert nib.load(os.path.join(out, "big_endian.nii.gz")).header.endianness == ">"
    # an Analyze-style pair: .hdr + .img
    pair = nib.Nifti1Pair(vol, aff)
    nib.save(pair, os.path.join(out, "pair.hdr"))


def reorient(src, codes, out):
    """Rewrites `src` with its voxels stored in orientation `codes` (e.g. PIR): data flipped
    and transposed, affine adjusted, so the world content is unchanged."""
    img = nib.load(src)
    cur = nib.orientations.io_orientation(img.affine)
    want = nib.orientations.axcodes2ornt(tuple(codes))
    xform = nib.orientations.ornt_transform(cur, want)
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), xform)
    aff = img.affine @ nib.orientations.inv_ornt_aff(xform, img.shape)
    new = nib.Nifti1Image(data.astype(img.get_data_dtype()), aff)
    new.set_qform(aff, code=1)
    new.set_sform(aff, code=1)
    nib.save(new, out)
    assert "".join(nib.aff2axcodes(nib.load(out).affine)) == codes


if __name__ == "__main__" and sys.argv[1] == "reorient":
    reorient(*sys.argv[2:5])
elif __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    {"orient": orient, "ramp": ramp, "labels": labels, "grid": grid, "bad": bad}[kind](out)
