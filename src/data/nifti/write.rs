//! Writing NIfTI-1 single-file images (.nii, or .nii.gz by extension) from a flat f32 buffer
//! and a voxel->world affine: sform and qform both set, a chosen on-disk type (float32, int16
//! with a scale slope, uint8 labels), written atomically. Used by `synth` and for predictions.
use crate::data::geometry::{Mat4, det3, voxel_sizes};
use crate::io::write_atomic;
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

/// How voxel values are stored on disk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Encoding {
    /// IEEE float32, values as given.
    Float32,
    /// int16 holding `round(value / slope)`, with `scl_slope = slope` so that readers recover
    /// the value; slope 1 stores rounded values. Values that do not fit are an error.
    Int16 { slope: f32 },
    /// uint8, for label maps; values must be whole numbers in 0..=255.
    UInt8,
}

/// Header fields that are not derived from the data (what readers show as provenance).
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderInfo {
    /// `descrip`, at most 79 bytes (longer text is cut).
    pub description: String,
    /// NIFTI_XFORM code for the sform: 1 scanner, 2 aligned, 3 talairach, 4 MNI.
    pub sform_code: i16,
    /// NIFTI_XFORM code for the qform (0 leaves the qform unset).
    pub qform_code: i16,
}

impl Default for HeaderInfo {
    fn default() -> Self {
        Self {
            description: format!("mtx-hpc {}", crate::TOOL_VERSION),
            sform_code: 1,
            qform_code: 1,
        }
    }
}

const HEADER_BYTES: usize = 348;
/// Header plus the 4-byte extension flag: where the voxel data starts.
const VOX_OFFSET: usize = 352;
/// libdeflate level: low levels are several times faster and cost only ~10-15% in size on
/// MRI volumes, and synth/predictions write many files.
const GZIP_LEVEL: i32 = 2;

/// Writes `data` (NIfTI order: i fastest, then j, then k) as a NIfTI-1 image at `path`,
/// gzip-compressed when the name ends in `.gz`. Replaces an existing file atomically: callers
/// that must not overwrite check first (as `synth` does without `--force`).
pub fn write_nifti(
    path: &Path,
    dims: [usize; 3],
    data: &[f32],
    affine: &Mat4,
    encoding: Encoding,
) -> Result<()> {
    write_nifti_with(path, dims, data, affine, encoding, &HeaderInfo::default())
}

/// [`write_nifti`] with chosen header codes and description.
pub fn write_nifti_with(
    path: &Path,
    dims: [usize; 3],
    data: &[f32],
    affine: &Mat4,
    encoding: Encoding,
    info: &HeaderInfo,
) -> Result<()> {
    let bytes = encode_nifti(dims, data, affine, encoding, info)
        .with_context(|| format!("{}: cannot encode NIfTI", path.display()))?;
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let out = if gz { gzip(&bytes)? } else { bytes };
    write_atomic(path, &out, true)
}

/// The uncompressed bytes of a single-file NIfTI-1 image (header, empty extension flag, data).
pub fn encode_nifti(
    dims: [usize; 3],
    data: &[f32],
    affine: &Mat4,
    encoding: Encoding,
    info: &HeaderInfo,
) -> Result<Vec<u8>> {
    let n: usize = dims.iter().product();
    ensure!(
        data.len() == n,
        "data holds {} voxels but dims {dims:?} need {n}",
        data.len()
    );
    for &d in &dims {
        ensure!(
            (1..=i16::MAX as usize).contains(&d),
            "dimension {d} out of range 1..=32767"
        );
    }
    ensure!(
        affine.iter().flatten().all(|v| v.is_finite()) && det3(affine).abs() > 1e-12,
        "affine is singular or not finite"
    );
    let (datatype, bitpix, slope) = match encoding {
        Encoding::Float32 => (16i16, 32i16, 1.0f32),
        Encoding::Int16 { slope } => {
            ensure!(
                slope.is_finite() && slope != 0.0,
                "int16 slope must be finite and non-zero, got {slope}"
            );
            (4, 16, slope)
        }
        Encoding::UInt8 => (2, 8, 1.0),
    };
    let mut out = vec![0u8; VOX_OFFSET + n * (bitpix as usize / 8)];
    write_header(
        &mut out[..HEADER_BYTES],
        dims,
        affine,
        datatype,
        bitpix,
        slope,
        info,
    );
    encode_voxels(&mut out[VOX_OFFSET..], data, encoding)?;
    Ok(out)
}

fn encode_voxels(out: &mut [u8], data: &[f32], encoding: Encoding) -> Result<()> {
    match encoding {
        Encoding::Float32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(data) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Encoding::Int16 { slope } => {
            let inv = 1.0 / slope as f64;
            for (idx, (o, &v)) in out.chunks_exact_mut(2).zip(data).enumerate() {
                let q = (v as f64 * inv).round();
                if !(q >= i16::MIN as f64 && q <= i16::MAX as f64) {
                    bail!("voxel {idx} value {v} does not fit int16 with slope {slope}");
                }
                o.copy_from_slice(&(q as i16).to_le_bytes());
            }
        }
        Encoding::UInt8 => {
            for (idx, (o, &v)) in out.iter_mut().zip(data).enumerate() {
                if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
                    bail!("voxel {idx} value {v} is not a label in 0..=255");
                }
                *o = v as u8;
            }
        }
    }
    Ok(())
}

fn write_header(
    h: &mut [u8],
    dims: [usize; 3],
    affine: &Mat4,
    datatype: i16,
    bitpix: i16,
    slope: f32,
    info: &HeaderInfo,
) {
    let put_i16 = |h: &mut [u8], at: usize, v: i16| h[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_i32 = |h: &mut [u8], at: usize, v: i32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut [u8], at: usize, v: f32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());

    put_i32(h, 0, HEADER_BYTES as i32);
    h[38] = b'r';
    let dim = [
        3,
        dims[0] as i16,
        dims[1] as i16,
        dims[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for (k, d) in dim.iter().enumerate() {
        put_i16(h, 40 + 2 * k, *d);
    }
    put_i16(h, 70, datatype);
    put_i16(h, 72, bitpix);

    let q = Quatern::from_affine(affine);
    let mut pixdim = [q.qfac, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    pixdim[1..4].copy_from_slice(&q.pixdim);
    for (k, p) in pixdim.iter().enumerate() {
        put_f32(h, 76 + 4 * k, *p as f32);
    }
    put_f32(h, 108, VOX_OFFSET as f32);
    put_f32(h, 112, slope);
    put_f32(h, 116, 0.0);
    h[123] = 2; // xyzt_units: millimetres
    let descrip = info.description.as_bytes();
    let len = descrip.len().min(79);
    h[148..148 + len].copy_from_slice(&descrip[..len]);

    put_i16(h, 252, info.qform_code);
    put_i16(h, 254, info.sform_code);
    for (k, v) in [q.b, q.c, q.d, affine[0][3], affine[1][3], affine[2][3]]
        .iter()
        .enumerate()
    {
        put_f32(h, 256 + 4 * k, *v as f32);
    }
    for (r, row) in affine.iter().take(3).enumerate() {
        for (c, v) in row.iter().enumerate() {
            put_f32(h, 280 + 16 * r + 4 * c, *v as f32);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
}

/// The qform view of an affine: a proper rotation as a unit quaternion (b, c, d; a >= 0
/// implied), voxel sizes, and qfac = -1 when the affine flips handedness.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quatern {
    pub b: f64,
    pub c: f64,
    pub d: f64,
    pub pixdim: [f64; 3],
    pub qfac: f64,
}

impl Quatern {
    /// The qform nearest to `affine`. Exact when the voxel axes are orthogonal (every affine a
    /// scanner or `synth` produces); a sheared affine gets the nearest rotation, as the sform
    /// keeps the exact matrix anyway.
    pub fn from_affine(affine: &Mat4) -> Self {
        let pixdim = voxel_sizes(affine);
        let mut r = [[0.0f64; 3]; 3];
        for (row, rr) in r.iter_mut().enumerate() {
            for (col, v) in rr.iter_mut().enumerate() {
                *v = affine[row][col] / pixdim[col].max(1e-12);
            }
        }
        let qfac = if det3(affine) < 0.0 { -1.0 } else { 1.0 };
        // The qform's third voxel axis is pre-multiplied by qfac: undo it to get a rotation.
        for rr in r.iter_mut() {
            rr[2] *= qfac;
        }
        let r = nearest_rotation(r);
        let (a, b, c, d) = quaternion_of(&r);
        let s = if a < 0.0 { -1.0 } else { 1.0 };
        Self {
            b: s * b,
            c: s * c,
            d: s * d,
            pixdim,
            qfac,
        }
    }
}

/// Polar decomposition by Newton iteration (R <- (R + R^-T) / 2): converges in a few steps
/// for near-orthogonal matrices and leaves an exact rotation untouched.
fn nearest_rotation(mut r: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    for _ in 0..20 {
        let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
            - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
            + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
        if det.abs() < 1e-12 {
            break;
        }
        // Inverse transpose = cofactor matrix / det.
        let mut next = r;
        let mut change = 0.0f64;
        for (i, row) in next.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let (i1, i2) = ((i + 1) % 3, (i + 2) % 3);
                let (j1, j2) = ((j + 1) % 3, (j + 2) % 3);
                let cof = r[i1][j1] * r[i2][j2] - r[i1][j2] * r[i2][j1];
                *v = 0.5 * (r[i][j] + cof / det);
                change = change.max((*v - r[i][j]).abs());
            }
        }
        r = next;
        if change < 1e-14 {
            break;
        }
    }
    r
}

/// Unit quaternion (a, b, c, d) of a proper rotation, choosing the numerically safest pivot.
fn quaternion_of(r: &[[f64; 3]; 3]) -> (f64, f64, f64, f64) {
    let trace = r[0][0] + r[1][1] + r[2][2];
    if trace > 0.0 {
        let s = 2.0 * (1.0 + trace).sqrt();
        (
            0.25 * s,
            (r[2][1] - r[1][2]) / s,
            (r[0][2] - r[2][0]) / s,
            (r[1][0] - r[0][1]) / s,
        )
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = 2.0 * (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt();
        (
            (r[2][1] - r[1][2]) / s,
            0.25 * s,
            (r[0][1] + r[1][0]) / s,
            (r[0][2] + r[2][0]) / s,
        )
    } else if r[1][1] > r[2][2] {
        let s = 2.0 * (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt();
        (
            (r[0][2] - r[2][0]) / s,
            (r[0][1] + r[1][0]) / s,
            0.25 * s,
            (r[1][2] + r[2][1]) / s,
        )
    } else {
        let s = 2.0 * (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt();
        (
            (r[1][0] - r[0][1]) / s,
            (r[0][2] + r[2][0]) / s,
            (r[1][2] + r[2][1]) / s,
            0.25 * s,
        )
    }
}

/// The qform affine rebuilt from (b, c, d, qfac, pixdim, offsets) as NIfTI-1 defines it.
pub fn qform_matrix(q: &Quatern, offset: [f64; 3]) -> Mat4 {
    crate::data::geometry::quaternion_affine([q.b, q.c, q.d], q.pixdim, q.qfac, offset)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let level = libdeflater::CompressionLvl::new(GZIP_LEVEL)
        .map_err(|e| anyhow::anyhow!("gzip level {GZIP_LEVEL}: {e:?}"))?;
    let mut compressor = libdeflater::Compressor::new(level);
    let mut out = vec![0u8; compressor.gzip_compress_bound(bytes.len())];
    let n = compressor
        .gzip_compress(bytes, &mut out)
        .context("gzip compression failed")?;
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique_lia() -> Mat4 {
        // LIA voxel axes with 1.2/0.9/1.4 mm, then a 5 degree rotation about an oblique axis.
        let base = [
            [-1.2, 0.0, 0.0, 90.0],
            [0.0, 0.0, 1.4, -120.0],
            [0.0, -0.9, 0.0, 100.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let t = 5f64.to_radians();
        let rot = [
            [t.cos(), -t.sin(), 0.0, 0.0],
            [t.sin(), t.cos(), 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        crate::data::geometry::mul(&rot, &base)
    }

    #[test]
    fn qform_reproduces_oblique_and_flipped_affines() {
        let mut ras = crate::data::geometry::IDENTITY;
        ras[0][0] = 1.1;
        for m in [oblique_lia(), ras] {
            let q = Quatern::from_affine(&m);
            let back = qform_matrix(&q, [m[0][3], m[1][3], m[2][3]]);
            for r in 0..3 {
                for c in 0..4 {
                    assert!((back[r][c] - m[r][c]).abs() < 1e-9, "{back:?} vs {m:?}");
                }
            }
        }
    }

    #[test]
    fn header_and_int16_data_round_trip_through_the_nifti_crate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.nii.gz");
        let dims = [4, 3, 2];
        let data: Vec<f32> = (0..24).map(|v| v as f32 * 1.5).collect();
        let affine = oblique_lia();
        write_nifti(&path, dims, &data, &affine, Encoding::Int16 { slope: 0.5 }).expect("write");
        let obj = nifti::ReaderOptions::new()
            .read_file(&path)
            .expect("nifti crate reads it");
        use nifti::{NiftiObject, NiftiVolume};
        let h = obj.header();
        assert_eq!(h.datatype, 4);
        assert_eq!(h.scl_slope, 0.5);
        assert_eq!(h.sform_code, 1);
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for c in 0..4 {
                assert!((row[c] as f64 - affine[r][c]).abs() < 1e-4);
            }
        }
        assert_eq!(obj.volume().dim(), &[4, 3, 2]);
        use nifti::IntoNdArray;
        let vol = obj.into_volume().into_ndarray::<f32>().expect("ndarray");
        for (idx, want) in data.iter().enumerate() {
            let (i, j, k) = (idx % 4, (idx / 4) % 3, idx / 12);
            assert_eq!(vol[[i, j, k].as_slice()], *want, "voxel {idx}");
        }
    }

    #[test]
    fn plain_nii_is_not_compressed_and_labels_stay_uint8() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("labels.nii");
        let labels = [0.0, 1.0, 2.0, 4.0, 0.0, 4.0];
        let affine = oblique_lia();
        write_nifti(&path, [3, 2, 1], &labels, &affine, Encoding::UInt8).expect("write");
        let bytes = std::fs::read(&path).expect("read back");
        assert_eq!(bytes.len(), VOX_OFFSET + labels.len());
        assert_eq!(&bytes[344..348], b"n+1\0");
        assert_eq!(&bytes[VOX_OFFSET..], &[0, 1, 2, 4, 0, 4]);
        assert_eq!(i16::from_le_bytes([bytes[70], bytes[71]]), 2);
    }

    #[test]
    fn values_that_do_not_fit_are_errors() {
        let affine = crate::data::geometry::IDENTITY;
        let info = HeaderInfo::default();
        assert!(encode_nifti([1, 1, 2], &[0.0, 3.5], &affine, Encoding::UInt8, &info).is_err());
        assert!(
            encode_nifti(
                [1, 1, 1],
                &[1e6],
                &affine,
                Encoding::Int16 { slope: 1.0 },
                &info
            )
            .is_err()
        );
        assert!(encode_nifti([1, 1, 2], &[0.0], &affine, Encoding::Float32, &info).is_err());
    }
}
