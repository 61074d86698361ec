//! Reading NIfTI-1 images (.nii, .nii.gz, .hdr/.img) with validation: every problem a user's
//! file can have becomes one error naming the file and the problem. Also picks the affine
//! (sform, else qform, else voxel sizes) and describes a file for `mtx-hpc inspect`.
use crate::data::geometry::{self, Mat4};
use crate::data::preprocess::AffineSource;
use anyhow::{Context, Result, bail};
use nifti::NiftiHeader;
use std::path::{Path, PathBuf};

/// A 3-D image in NIfTI voxel order (i fastest), intensities scaled by scl_slope/scl_inter.
#[derive(Clone, Debug)]
pub struct NiftiImage {
    pub path: PathBuf,
    pub dims: [usize; 3],
    pub data: Vec<f32>,
    /// Voxel index -> world millimetres (RAS+).
    pub affine: Mat4,
    pub affine_source: AffineSource,
    pub header: NiftiHeader,
    /// Things the user should know (e.g. no sform/qform: voxel sizes alone were used).
    pub warnings: Vec<String>,
}

/// A label map (segmentation): integer labels 0..=255.
#[derive(Clone, Debug)]
pub struct LabelImage {
    pub path: PathBuf,
    pub dims: [usize; 3],
    pub labels: Vec<u8>,
    pub affine: Mat4,
    pub affine_source: AffineSource,
    pub header: NiftiHeader,
    pub warnings: Vec<String>,
}

/// Voxel storage types we read (complex and RGB images are not anatomical scans).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Dtype {
    fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            16 => Self::F32,
            64 => Self::F64,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::U16 => "uint16",
            Self::I32 => "int32",
            Self::U32 => "uint32",
            Self::I64 => "int64",
            Self::U64 => "uint64",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64)
    }
}

/// A validated image whose voxels are still the file's bytes (one 3-D volume of them):
/// preprocessing converts them while resampling instead of in a separate pass.
#[derive(Clone, Debug)]
pub struct RawImage {
    pub path: PathBuf,
    pub header: NiftiHeader,
    pub dims: [usize; 3],
    pub dtype: Dtype,
    /// The file's bytes (decompressed); the selected volume starts at `data_offset`. Kept
    /// whole rather than copied out: a copy of a large volume costs as much as converting it.
    pub bytes: Vec<u8>,
    pub data_offset: usize,
    /// Byte order of the voxels.
    pub big_endian: bool,
    /// Applied when scl_slope is non-zero and finite (NIfTI: slope 0 means unscaled).
    pub scale: Option<(f32, f32)>,
    pub affine: Mat4,
    pub affine_source: AffineSource,
    pub warnings: Vec<String>,
}

const HEADER_SIZE: usize = 348;

/// Reads a 3-D image (or volume `volume` of a 4-D one) as f32 with every check of
/// [`read_raw`], plus: no NaN or infinite voxels.
pub fn read_image(path: &Path, volume: Option<usize>) -> Result<NiftiImage> {
    let raw = read_raw(path, volume)?;
    let data = raw.to_f32()?;
    Ok(NiftiImage {
        path: raw.path.clone(),
        dims: raw.dims,
        data,
        affine: raw.affine,
        affine_source: raw.affine_source,
        header: raw.header.clone(),
        warnings: raw.warnings.clone(),
    })
}

/// Reads a 3-D label map; labels must be whole numbers in 0..=255.
pub fn read_labels(path: &Path) -> Result<LabelImage> {
    let raw = read_raw(path, None)?;
    let values = raw.to_f32()?;
    let mut labels = Vec::with_capacity(values.len());
    let mut bad = 0usize;
    let mut example = 0.0f32;
    for &v in &values {
        if v.fract() != 0.0 || !(0.0..=255.0).contains(&v) {
            if bad == 0 {
                example = v;
            }
            bad += 1;
            labels.push(0);
        } else {
            labels.push(v as u8);
        }
    }
    if bad > 0 {
        bail!(
            "{}: not a label map: {bad} voxels are not whole numbers in 0..=255 (e.g. {example})",
            path.display()
        );
    }
    Ok(LabelImage {
        path: raw.path.clone(),
        dims: raw.dims,
        labels,
        affine: raw.affine,
        affine_source: raw.affine_source,
        header: raw.header.clone(),
        warnings: raw.warnings.clone(),
    })
}

/// Reads and validates the header and the voxel bytes of one 3-D volume.
pub fn read_raw(path: &Path, volume: Option<usize>) -> Result<RawImage> {
    let name = path.display();
    if !path.exists() {
        bail!("{name}: file not found");
    }
    let lower = path.to_string_lossy().to_ascii_lowercase();
    let pair = lower.ends_with(".hdr") || lower.ends_with(".hdr.gz");
    let header_bytes = read_maybe_gz(path)?;
    let header = parse_header(path, &header_bytes)?;
    let dtype = Dtype::from_code(header.datatype).with_context(|| {
        format!(
            "{name}: unsupported datatype code {} (supported: integer and float scalars)",
            header.datatype
        )
    })?;
    let (dims, volumes) = check_dims(path, &header)?;
    let picked = match (volumes, volume) {
        // --volume picks from 4-D inputs; a manifest may mix them with 3-D ones.
        (1, _) => 0,
        (n, None) => bail!(
            "{name}: 4-D image with {n} volumes; pick one with --volume K (0..{})",
            n - 1
        ),
        (n, Some(k)) if k >= n => {
            bail!(
                "{name}: --volume {k} is out of range: the image has {n} volumes (0..{})",
                n - 1
            )
        }
        (_, Some(k)) => k,
    };
    check_voxel_sizes(path, &header)?;

    let (data_file, offset, data_bytes) = if pair {
        let img = image_file_of(path)?;
        let bytes = read_maybe_gz(&img)?;
        (img, 0usize, bytes)
    } else {
        let off = header.vox_offset;
        if !off.is_finite() || off < HEADER_SIZE as f32 {
            bail!("{name}: invalid vox_offset {off} (must be at least 348 in a .nii file)");
        }
        (path.to_path_buf(), off as usize, header_bytes)
    };
    // Checked: a damaged header can promise more bytes than a usize holds.
    let vol_bytes = dims[0]
        .checked_mul(dims[1])
        .and_then(|v| v.checked_mul(dims[2]))
        .and_then(|v| v.checked_mul(dtype.size()));
    let needed = vol_bytes
        .and_then(|v| v.checked_mul(volumes))
        .and_then(|v| v.checked_add(offset));
    let (Some(vol_bytes), Some(needed)) = (vol_bytes, needed) else {
        bail!(
            "{name}: impossible dimensions {:?} in the header",
            &header.dim
        );
    };
    let start = offset + picked * vol_bytes;
    if data_bytes.len() < needed {
        bail!(
            "{}: truncated: the header promises {} bytes of voxel data, the file holds {}",
            data_file.display(),
            volumes * vol_bytes,
            data_bytes.len().saturating_sub(offset)
        );
    }

    let mut warnings = Vec::new();
    let (affine, affine_source) = pick_affine(&header);
    if affine_source == AffineSource::VoxelSizes {
        warnings.push(format!(
            "{name}: sform_code and qform_code are both 0: orientation unknown, using voxel \
             sizes alone (voxel axes taken as R, A, S)"
        ));
    }
    check_affine(path, &affine, affine_source)?;
    let scale = (header.scl_slope != 0.0 && header.scl_slope.is_finite()).then(|| {
        let inter = if header.scl_inter.is_finite() {
            header.scl_inter
        } else {
            0.0
        };
        (header.scl_slope, inter)
    });
    let big_endian = header.endianness == nifti::Endianness::Big;
    Ok(RawImage {
        path: path.to_path_buf(),
        header,
        dims,
        dtype,
        bytes: data_bytes,
        data_offset: start,
        big_endian,
        scale,
        affine,
        affine_source,
        warnings,
    })
}

impl RawImage {
    /// The selected volume's bytes.
    pub fn voxel_bytes(&self) -> &[u8] {
        let n = self.dims[0] * self.dims[1] * self.dims[2] * self.dtype.size();
        &self.bytes[self.data_offset..self.data_offset + n]
    }

    /// Converts voxels `first..first + out.len()` (NIfTI order) to scaled f32.
    #[inline]
    pub fn convert_into(&self, first: usize, out: &mut [f32]) {
        let size = self.dtype.size();
        let start = self.data_offset + first * size;
        let bytes = &self.bytes[start..start + out.len() * size];
        convert(bytes, self.dtype, self.big_endian, out);
        if let Some((s, i)) = self.scale {
            out.iter_mut().for_each(|v| *v = *v * s + i);
        }
    }

    /// `dst[x] += w * voxel(i0 + x, j, k)` (scaled) for x in 0..dst.len(): converting and
    /// accumulating in one sweep saves a store and a load per voxel in the resampler.
    #[inline]
    pub fn axpy_row(&self, w: f32, i0: usize, j: usize, k: usize, dst: &mut [f32]) {
        let (ws, wi) = match self.scale {
            Some((s, i)) => (w * s, w * i),
            None => (w, 0.0),
        };
        let first = (k * self.dims[1] + j) * self.dims[0] + i0;
        let size = self.dtype.size();
        let start = self.data_offset + first * size;
        let bytes = &self.bytes[start..start + dst.len() * size];
        macro_rules! acc {
            ($t:ty, $n:expr) => {{
                let big = self.big_endian;
                for (o, c) in dst.iter_mut().zip(bytes.chunks_exact($n)) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    let v = if big {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    };
                    *o += ws * (v as f32) + wi;
                }
            }};
        }
        match self.dtype {
            Dtype::U8 => dst
                .iter_mut()
                .zip(bytes)
                .for_each(|(o, &b)| *o += ws * f32::from(b) + wi),
            Dtype::I8 => dst
                .iter_mut()
                .zip(bytes)
                .for_each(|(o, &b)| *o += ws * f32::from(b as i8) + wi),
            Dtype::I16 => acc!(i16, 2),
            Dtype::U16 => acc!(u16, 2),
            Dtype::I32 => acc!(i32, 4),
            Dtype::U32 => acc!(u32, 4),
            Dtype::I64 => acc!(i64, 8),
            Dtype::U64 => acc!(u64, 8),
            Dtype::F32 => acc!(f32, 4),
            Dtype::F64 => acc!(f64, 8),
        }
    }

    /// Row (j, k) of the volume (all i) as scaled f32.
    #[inline]
    pub fn row_into(&self, j: usize, k: usize, out: &mut [f32]) {
        self.convert_into(
            (k * self.dims[1] + j) * self.dims[0],
            &mut out[..self.dims[0]],
        );
    }

    /// Fails on NaN or infinite voxels, saying how many. Integer voxels are finite, so only
    /// float data (or a scale that overflows f32) needs the scan.
    pub fn check_finite(&self) -> Result<()> {
        let scale_overflows = self.scale.is_some_and(|(s, i)| {
            let extreme = match self.dtype {
                Dtype::U8 | Dtype::I8 => 255.0f64,
                Dtype::I16 | Dtype::U16 => 65535.0,
                _ => f64::from(u32::MAX),
            };
            let top = (f64::from(s) * extreme + f64::from(i)).abs();
            top.is_nan() || top >= f64::from(f32::MAX)
        });
        if !self.dtype.is_float() && !scale_overflows {
            return Ok(());
        }
        let n = self.dims[0] * self.dims[1] * self.dims[2];
        let mut buf = vec![0.0f32; self.dims[0]];
        let mut bad = 0usize;
        for row in 0..n / self.dims[0] {
            self.convert_into(row * self.dims[0], &mut buf);
            bad += buf.iter().filter(|v| !v.is_finite()).count();
        }
        if bad > 0 {
            bail!(
                "{}: {bad} of {n} voxels are NaN or infinite",
                self.path.display()
            );
        }
        Ok(())
    }

    /// All voxels as scaled f32; fails on NaN or infinite values, saying how many.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_finite()?;
        let n = self.dims[0] * self.dims[1] * self.dims[2];
        let mut out = vec![0.0f32; n];
        self.convert_into(0, &mut out);
        Ok(out)
    }
}

/// Bytes of `dtype` in the given byte order to f32 (written so that the compiler can
/// vectorise the common little-endian integer cases).
#[inline]
fn convert(bytes: &[u8], dtype: Dtype, big: bool, out: &mut [f32]) {
    macro_rules! conv {
        ($t:ty, $n:expr) => {{
            if big {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact($n)) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    *o = <$t>::from_be_bytes(a) as f32;
                }
            } else {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact($n)) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    *o = <$t>::from_le_bytes(a) as f32;
                }
            }
        }};
    }
    match dtype {
        Dtype::U8 => out
            .iter_mut()
            .zip(bytes)
            .for_each(|(o, &b)| *o = f32::from(b)),
        Dtype::I8 => out
            .iter_mut()
            .zip(bytes)
            .for_each(|(o, &b)| *o = f32::from(b as i8)),
        Dtype::I16 => conv!(i16, 2),
        Dtype::U16 => conv!(u16, 2),
        Dtype::I32 => conv!(i32, 4),
        Dtype::U32 => conv!(u32, 4),
        Dtype::I64 => conv!(i64, 8),
        Dtype::U64 => conv!(u64, 8),
        Dtype::F32 => conv!(f32, 4),
        Dtype::F64 => conv!(f64, 8),
    }
}

/// The whole file, decompressed in one shot when it is gzip (detected by its magic bytes,
/// so a misnamed file still reads). libdeflate needs the output size up front: the gzip
/// trailer holds it (modulo 2^32), checked against deflate's maximum ratio.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let name = path.display();
    let mut bytes = buffers::take_smallest();
    bytes.clear();
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut bytes))
        .with_context(|| format!("{name}: cannot read"))?;
    if bytes.len() < 2 || bytes[0] != 0x1f || bytes[1] != 0x8b {
        return Ok(bytes);
    }
    if bytes.len() < 18 {
        bail!("{name}: truncated gzip file ({} bytes)", bytes.len());
    }
    let t = bytes.len() - 4;
    let isize = u32::from_le_bytes([bytes[t], bytes[t + 1], bytes[t + 2], bytes[t + 3]]) as usize;
    // Deflate cannot expand more than ~1032:1; a larger claim means a damaged trailer.
    let plausible = isize <= bytes.len().saturating_mul(1032) + 1024;
    if plausible {
        let mut out = buffers::take_largest();
        // A reused buffer is already initialised up to its length: only growth is zeroed.
        if out.len() < isize {
            out.resize(isize, 0);
        }
        out.truncate(isize);
        let mut dec = libdeflater::Decompressor::new();
        if let Ok(n) = dec.gzip_decompress(&bytes, &mut out)
            && n == isize
        {
            buffers::give_back(bytes);
            return Ok(out);
        }
        buffers::give_back(out);
    }
    // Either damaged, larger than 4 GiB, or several gzip members: the streaming decoder
    // tells which, and reads the last two correctly.
    let mut out = Vec::with_capacity(bytes.len() * 4);
    use std::io::Read;
    flate2::read::MultiGzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|e| anyhow::anyhow!("{name}: truncated or corrupt .gz file ({e})"))?;
    buffers::give_back(bytes);
    Ok(out)
}

/// Large byte buffers kept per thread between files: a fresh 30 MB buffer costs thousands of
/// page faults (the kernel zeroes every page), about as much as converting its voxels. Each
/// thread keeps at most two (compressed input, decompressed output) between subjects.
mod buffers {
    use std::cell::RefCell;

    thread_local! {
        static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    fn take(pick: impl Fn(&[Vec<u8>]) -> Option<usize>) -> Vec<u8> {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            pick(&s).map(|i| s.swap_remove(i)).unwrap_or_default()
        })
    }

    pub fn take_largest() -> Vec<u8> {
        take(|v| (0..v.len()).max_by_key(|&i| v[i].capacity()))
    }

    pub fn take_smallest() -> Vec<u8> {
        take(|v| (0..v.len()).min_by_key(|&i| v[i].capacity()))
    }

    pub fn give_back(buf: Vec<u8>) {
        if buf.capacity() < 1 << 20 {
            return;
        }
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            s.push(buf);
            if s.len() > 2 {
                // Keep the two largest.
                if let Some(i) = (0..s.len()).min_by_key(|&i| s[i].capacity()) {
                    s.swap_remove(i);
                }
            }
        });
    }
}

impl Drop for RawImage {
    fn drop(&mut self) {
        buffers::give_back(std::mem::take(&mut self.bytes));
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<NiftiHeader> {
    let name = path.display();
    if bytes.len() < HEADER_SIZE {
        bail!(
            "{name}: not a NIfTI file (only {} bytes; a NIfTI-1 header has 348)",
            bytes.len()
        );
    }
    let sizeof_le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let sizeof_be = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if sizeof_le == 540 || sizeof_be == 540 {
        bail!("{name}: NIfTI-2 files are not supported (convert to NIfTI-1)");
    }
    if sizeof_le != 348 && sizeof_be != 348 {
        bail!("{name}: not a NIfTI file (sizeof_hdr is not 348)");
    }
    let magic = &bytes[344..348];
    if magic != b"n+1\0" && magic != b"ni1\0" {
        bail!(
            "{name}: not a NIfTI-1 file (bad magic {:?})",
            String::from_utf8_lossy(magic)
        );
    }
    NiftiHeader::from_reader(&bytes[..HEADER_SIZE])
        .map_err(|e| anyhow::anyhow!("{name}: invalid NIfTI header ({e})"))
}

/// The first three dimensions and the number of 3-D volumes (product of dims 4..7).
fn check_dims(path: &Path, h: &NiftiHeader) -> Result<([usize; 3], usize)> {
    let name = path.display();
    let ndim = usize::from(h.dim[0]);
    if !(1..=7).contains(&ndim) {
        bail!("{name}: invalid dim[0] = {ndim} (must be 1..7)");
    }
    if ndim < 3 {
        bail!("{name}: {ndim}-D image; a 3-D volume is needed");
    }
    let mut dims = [0usize; 3];
    for (d, &v) in dims.iter_mut().zip(&h.dim[1..4]) {
        if v == 0 || v > 32767 {
            bail!("{name}: invalid dimensions {:?}", &h.dim[1..=ndim]);
        }
        *d = usize::from(v);
    }
    let mut volumes = 1usize;
    for &v in &h.dim[4..=ndim.max(3)] {
        if v == 0 || v > 32767 {
            bail!("{name}: invalid dimensions {:?}", &h.dim[1..=ndim]);
        }
        volumes *= usize::from(v);
    }
    Ok((dims, volumes))
}

fn check_voxel_sizes(path: &Path, h: &NiftiHeader) -> Result<()> {
    for k in 1..4 {
        let v = h.pixdim[k];
        let what = if v.is_nan() {
            "NaN"
        } else if v == 0.0 {
            "zero"
        } else if v < 0.0 {
            "negative"
        } else if !v.is_finite() {
            "infinite"
        } else {
            continue;
        };
        bail!(
            "{}: {what} voxel size: pixdim[{k}] = {v} (pixdim = {:?})",
            path.display(),
            &h.pixdim[1..4]
        );
    }
    Ok(())
}

fn check_affine(path: &Path, m: &Mat4, source: AffineSource) -> Result<()> {
    let name = path.display();
    let finite = m.iter().flatten().all(|v| v.is_finite());
    let sizes = geometry::voxel_sizes(m);
    let scale = sizes[0] * sizes[1] * sizes[2];
    let det = geometry::det3(m);
    // Relative to the column lengths, so tiny voxels are not mistaken for a singular matrix.
    if !finite || scale == 0.0 || det.abs() < 1e-6 * scale || geometry::inverse(m).is_none() {
        bail!(
            "{name}: singular affine ({}): voxel axes do not span 3-D space; matrix rows {:?}",
            source_name(source),
            &m[..3]
        );
    }
    Ok(())
}

pub fn source_name(source: AffineSource) -> &'static str {
    match source {
        AffineSource::Sform => "sform",
        AffineSource::Qform => "qform",
        AffineSource::VoxelSizes => "voxel sizes",
    }
}

/// sform when its code is set, else qform, else voxel sizes alone (NIfTI "method 1").
pub fn pick_affine(h: &NiftiHeader) -> (Mat4, AffineSource) {
    if h.sform_code > 0 {
        (sform_affine(h), AffineSource::Sform)
    } else if h.qform_code > 0 {
        (qform_affine(h), AffineSource::Qform)
    } else {
        let mut m = geometry::IDENTITY;
        for (k, row) in m.iter_mut().take(3).enumerate() {
            row[k] = f64::from(h.pixdim[k + 1]);
        }
        (m, AffineSource::VoxelSizes)
    }
}

pub fn sform_affine(h: &NiftiHeader) -> Mat4 {
    let row = |r: &[f32; 4]| r.map(f64::from);
    [
        row(&h.srow_x),
        row(&h.srow_y),
        row(&h.srow_z),
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// The qform from its quaternion (b, c, d; a recovered from unit length), the voxel sizes and
/// qfac = pixdim[0] (-1 flips the third axis), as the NIfTI-1 standard defines it.
pub fn qform_affine(h: &NiftiHeader) -> Mat4 {
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    geometry::quaternion_affine(
        [h.quatern_b, h.quatern_c, h.quatern_d].map(f64::from),
        [h.pixdim[1], h.pixdim[2], h.pixdim[3]].map(f64::from),
        qfac,
        [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from),
    )
}

/// The .img file that goes with a .hdr (also .img.gz).
fn image_file_of(hdr: &Path) -> Result<PathBuf> {
    let s = hdr.to_string_lossy();
    let stem = s
        .strip_suffix(".gz")
        .unwrap_or(&s)
        .strip_suffix(".hdr")
        .or_else(|| s.strip_suffix(".HDR"))
        .unwrap_or(&s)
        .to_string();
    for ext in [".img", ".img.gz", ".IMG"] {
        let p = PathBuf::from(format!("{stem}{ext}"));
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{}: header found but its data file {stem}.img is missing",
        hdr.display()
    )
}

/// Text summary of a NIfTI file for `mtx-hpc inspect`.
pub fn describe(path: &Path) -> Result<String> {
    let raw = read_raw(path, Some(0))?;
    let h = &raw.header;
    let data = raw.to_f32()?;
    let ndim = usize::from(h.dim[0]);
    let mut s = String::new();
    use std::fmt::Write;
    let descrip = String::from_utf8_lossy(&h.descrip);
    let _ = writeln!(s, "NIfTI-1 file: {}", path.display());
    let _ = writeln!(
        s,
        "  datatype: {} (code {}, {} bits), byte order: {}",
        raw.dtype.name(),
        h.datatype,
        h.bitpix,
        if raw.big_endian {
            "big-endian"
        } else {
            "little-endian"
        }
    );
    let _ = writeln!(s, "  dim: {:?}", &h.dim[..=ndim]);
    let _ = writeln!(s, "  pixdim: {:?}", &h.pixdim[..=ndim]);
    let _ = writeln!(
        s,
        "  scl_slope: {}, scl_inter: {}",
        h.scl_slope, h.scl_inter
    );
    let _ = writeln!(s, "  description: {:?}", descrip.trim_end_matches('\0'));
    let _ = writeln!(s, "  qform_code: {}", h.qform_code);
    if h.qform_code > 0 {
        write_matrix(&mut s, &qform_affine(h));
    }
    let _ = writeln!(s, "  sform_code: {}", h.sform_code);
    if h.sform_code > 0 {
        write_matrix(&mut s, &sform_affine(h));
    }
    let sizes = geometry::voxel_sizes(&raw.affine);
    let _ = writeln!(
        s,
        "  affine used: {}; orientation {}",
        source_name(raw.affine_source),
        geometry::axcodes(&raw.affine)
    );
    let _ = writeln!(
        s,
        "  shape: {} x {} x {}{}",
        raw.dims[0],
        raw.dims[1],
        raw.dims[2],
        if ndim > 3 {
            format!(" (4-D: {:?}; volume 0 shown)", &h.dim[4..=ndim])
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "  voxel size: {:.4} x {:.4} x {:.4} mm",
        sizes[0], sizes[1], sizes[2]
    );
    let mut sorted = data;
    let n = sorted.len();
    let p_lo = (n - 1) * 5 / 1000;
    let p_hi = (n - 1) * 995 / 1000;
    let (_, &mut lo, _) = sorted.select_nth_unstable_by(p_lo, f32::total_cmp);
    let (_, &mut hi, _) = sorted.select_nth_unstable_by(p_hi, f32::total_cmp);
    let min = sorted.iter().copied().fold(f32::INFINITY, f32::min);
    let max = sorted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let _ = writeln!(
        s,
        "  intensity: min {min}, max {max}, 0.5th percentile {lo}, 99.5th percentile {hi}"
    );
    for w in &raw.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    Ok(s)
}

fn write_matrix(s: &mut String, m: &Mat4) {
    use std::fmt::Write;
    for row in &m[..3] {
        let _ = writeln!(
            s,
            "    [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
            row[0], row[1], row[2], row[3]
        );
    }
}
