//! 4x4 affine matrices (voxel index -> world millimetres, RAS+) and the few operations
//! preprocessing and the cohort generator need. Row-major: `m[row][col]`, points are columns.
// Matrix maths reads best with explicit row and column indices.
pub type Mat4 = [[f64; 4]; 4];

pub const IDENTITY: Mat4 = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

/// `a * b` (apply `b` first).
pub fn mul(a: &Mat4, b: &Mat4) -> Mat4 {
    let mut out = [[0.0; 4]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    out
}

/// Applies `m` to the point `p`.
pub fn apply(m: &Mat4, p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (r, v) in out.iter_mut().enumerate() {
        *v = m[r][0] * p[0] + m[r][1] * p[1] + m[r][2] * p[2] + m[r][3];
    }
    out
}

/// Determinant of the upper-left 3x3 block (zero means the affine is singular).
pub fn det3(m: &Mat4) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Inverse of an affine matrix (last row 0 0 0 1), or None when singular or not finite.
pub fn inverse(m: &Mat4) -> Option<Mat4> {
    let d = det3(m);
    if !d.is_finite() || d.abs() < 1e-12 {
        return None;
    }
    let mut inv = [[0.0; 4]; 4];
    // Adjugate of the 3x3 block divided by the determinant.
    for r in 0..3 {
        for c in 0..3 {
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            inv[r][c] = (m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1]) / d;
        }
    }
    for r in 0..3 {
        inv[r][3] = -(0..3).map(|k| inv[r][k] * m[k][3]).sum::<f64>();
    }
    inv[3][3] = 1.0;
    Some(inv)
}

/// Length of each voxel axis in millimetres (column norms of the 3x3 block).
pub fn voxel_sizes(m: &Mat4) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (c, v) in out.iter_mut().enumerate() {
        *v = (0..3).map(|r| m[r][c] * m[r][c]).sum::<f64>().sqrt();
    }
    out
}

/// Orientation code of an affine, e.g. "RAS" or "LPI": for each voxel axis, the world
/// direction it mostly points to (nibabel's `aff2axcodes`).
pub fn axcodes(m: &Mat4) -> String {
    let mut out = String::new();
    for c in 0..3 {
        let (mut best, mut sign) = (0, 1.0);
        for r in 0..3 {
            if m[r][c].abs() > m[best][c].abs() {
                best = r;
            }
        }
        if m[best][c] < 0.0 {
            sign = -1.0;
        }
        let letters = [['R', 'L'], ['A', 'P'], ['S', 'I']];
        out.push(letters[best][usize::from(sign < 0.0)]);
    }
    out
}

/// The NIfTI-1 qform: rotation from the quaternion (b, c, d; a recovered from unit length),
/// voxel sizes `pixdim`, `qfac` (-1 flips the third axis) and the offset, as the standard
/// defines it. Shared by the reader and the writer so they cannot disagree.
pub fn quaternion_affine(bcd: [f64; 3], pixdim: [f64; 3], qfac: f64, offset: [f64; 3]) -> Mat4 {
    let [mut b, mut c, mut d] = bcd;
    let sq = b * b + c * c + d * d;
    let a = if sq > 1.0 {
        // Rounding pushed it past unit length: renormalise, a rotation by 180 degrees.
        let n = sq.sqrt();
        (b, c, d) = (b / n, c / n, d / n);
        0.0
    } else {
        (1.0 - sq).sqrt()
    };
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - b * b - c * c,
        ],
    ];
    let s = [pixdim[0], pixdim[1], pixdim[2] * qfac];
    let mut m = IDENTITY;
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = r[i][j] * s[j];
        }
        m[i][3] = offset[i];
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_an_oblique_affine() {
        let m = [
            [0.0, -1.2, 0.1, 90.0],
            [0.9, 0.05, 0.0, -126.0],
            [0.02, 0.0, 1.1, -72.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let inv = inverse(&m).expect("invertible");
        let p = [3.0, -7.0, 11.0];
        let q = apply(&inv, apply(&m, p));
        for k in 0..3 {
            assert!((p[k] - q[k]).abs() < 1e-9, "{p:?} != {q:?}");
        }
        // Voxel axis 0 points mostly to +y (A), axis 1 to -x (L), axis 2 to +z (S).
        assert_eq!(axcodes(&m), "ALS");
    }

    #[test]
    fn singular_affine_has_no_inverse() {
        let mut m = IDENTITY;
        m[2][2] = 0.0;
        assert!(inverse(&m).is_none());
    }
}
