//! The source volume as the preprocessing steps see it: rows of f32 along the first (fastest)
//! voxel axis, converted from the file's bytes on demand so that no step pays for converting
//! voxels it never reads.
use crate::data::nifti::read::RawImage;

#[derive(Clone, Copy)]
pub enum SourceVolume<'a> {
    /// The file's voxels, converted and scaled row by row.
    Raw(&'a RawImage),
    /// Voxels already in f32, NIfTI order.
    F32 { data: &'a [f32], dims: [usize; 3] },
}

impl SourceVolume<'_> {
    pub fn dims(&self) -> [usize; 3] {
        match self {
            Self::Raw(r) => r.dims,
            Self::F32 { dims, .. } => *dims,
        }
    }

    /// Row (j, k), all i: borrowed when already f32, else converted into `scratch` (which
    /// must hold at least dims[0] values).
    #[inline]
    pub fn row<'b>(&'b self, j: usize, k: usize, scratch: &'b mut [f32]) -> &'b [f32] {
        match self {
            Self::Raw(r) => {
                r.row_into(j, k, scratch);
                &scratch[..r.dims[0]]
            }
            Self::F32 { data, dims } => &data[(k * dims[1] + j) * dims[0]..][..dims[0]],
        }
    }

    /// `dst[x] += w * voxel(i0 + x, j, k)` for x in 0..dst.len().
    #[inline]
    pub fn axpy_row(&self, w: f32, i0: usize, j: usize, k: usize, dst: &mut [f32]) {
        match self {
            Self::Raw(r) => r.axpy_row(w, i0, j, k, dst),
            Self::F32 { data, dims } => {
                let row = &data[(k * dims[1] + j) * dims[0] + i0..][..dst.len()];
                dst.iter_mut().zip(row).for_each(|(o, v)| *o += w * v);
            }
        }
    }

    /// The whole volume as f32 (for the oblique path, which samples anywhere).
    pub fn to_vec(&self) -> Vec<f32> {
        match self {
            Self::Raw(r) => {
                let n = r.dims[0] * r.dims[1] * r.dims[2];
                let mut out = vec![0.0f32; n];
                r.convert_into(0, &mut out);
                out
            }
            Self::F32 { data, .. } => data.to_vec(),
        }
    }
}
