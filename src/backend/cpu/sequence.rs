//! Sequence assembly for the transformer: token embedding (scaled slice vectors plus position
//! and plane codes), masking rows with the [MASK] vector, and gathering/scattering rows (the
//! masked positions the MEVP loss looks at). Row indices come from the host.
use super::Real;

/// `y[bi, ti, :] = x[bi, ti, :] * scale + pos[ti, :] + plane[:]`.
pub fn embed_forward<T: Real>(
    b: usize,
    t: usize,
    d: usize,
    scale: f32,
    x: &[T],
    pos: &[T],
    plane: &[T],
    y: &mut [T],
) {
    let scale = T::of(scale);
    let (x, y, pos, plane) = (
        &x[..b * t * d],
        &mut y[..b * t * d],
        &pos[..t * d],
        &plane[..d],
    );
    for (row, (yr, xr)) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
        let pr = &pos[(row % t) * d..][..d];
        for j in 0..d {
            yr[j] = xr[j] * scale + pr[j] + plane[j];
        }
    }
}

/// `dx = dy * scale`; `dplane += sum over rows of dy`, rows in order.
pub fn embed_backward<T: Real>(
    b: usize,
    t: usize,
    d: usize,
    scale: f32,
    dy: &[T],
    dx: &mut [T],
    dplane: &mut [T],
) {
    let scale = T::of(scale);
    let (dy, dx, dplane) = (&dy[..b * t * d], &mut dx[..b * t * d], &mut dplane[..d]);
    for (dxr, dyr) in dx.chunks_exact_mut(d).zip(dy.chunks_exact(d)) {
        for j in 0..d {
            dxr[j] = dyr[j] * scale;
            dplane[j] += dyr[j];
        }
    }
}

/// `x[rows[i], :] = token`.
pub fn mask_scatter<T: Real>(d: usize, rows: &[u32], token: &[T], x: &mut [T]) {
    for &r in rows {
        let r = r as usize;
        x[r * d..(r + 1) * d].copy_from_slice(&token[..d]);
    }
}

/// `y[i, :] = x[rows[i], :]`.
pub fn gather_rows<T: Real>(d: usize, rows: &[u32], x: &[T], y: &mut [T]) {
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        y[i * d..(i + 1) * d].copy_from_slice(&x[r * d..(r + 1) * d]);
    }
}

/// `dx[rows[i], :] += dy[i, :]`: the backward of [`gather_rows`].
pub fn scatter_add_rows<T: Real>(d: usize, rows: &[u32], dy: &[T], dx: &mut [T]) {
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        for (a, &g) in dx[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&dy[i * d..(i + 1) * d])
        {
            *a += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, dot, random};

    #[test]
    fn embed_backward_matches_finite_differences() {
        let (b, t, d, scale) = (3, 5, 7, 8f32.sqrt());
        let (mut x, pos, mut plane) = (random(b * t * d, 1), random(t * d, 2), random(d, 3));
        let r = random(b * t * d, 4);
        let fwd = |x: &[f64], plane: &[f64]| {
            let mut y = vec![f64::NAN; b * t * d];
            embed_forward(b, t, d, scale, x, &pos, plane, &mut y);
            dot(&y, &r)
        };
        let mut dx = vec![f64::NAN; x.len()];
        // dplane accumulates: start it at a known value and subtract.
        let mut dplane = vec![0.5; d];
        embed_backward(b, t, d, scale, &r, &mut dx, &mut dplane);
        dplane.iter_mut().for_each(|g| *g -= 0.5);
        let (x0, p0) = (x.clone(), plane.clone());
        check("embed dx", &mut x, &dx, 1000, 1e-7, |x| fwd(x, &p0));
        check("embed dplane", &mut plane, &dplane, 1000, 1e-7, |p| {
            fwd(&x0, p)
        });
        // The position code is added as is.
        let mut y = vec![0.0; b * t * d];
        embed_forward(
            b,
            t,
            d,
            scale,
            &vec![0.0; b * t * d],
            &pos,
            &vec![0.0; d],
            &mut y,
        );
        assert_eq!(&y[2 * t * d + 3 * d..][..d], &pos[3 * d..4 * d]);
    }

    #[test]
    fn masking_gathering_and_scattering_use_exact_rows() {
        let d = 3;
        let mut x: Vec<f64> = (0..6 * d).map(|v| v as f64).collect();
        mask_scatter(d, &[4, 1], &[-1.0, -2.0, -3.0], &mut x);
        assert_eq!(&x[3..6], &[-1.0, -2.0, -3.0]);
        assert_eq!(&x[12..15], &[-1.0, -2.0, -3.0]);
        assert_eq!(&x[6..12], &[6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        let mut y = vec![f64::NAN; 2 * d];
        gather_rows(d, &[5, 0], &x, &mut y);
        assert_eq!(y, [15.0, 16.0, 17.0, 0.0, 1.0, 2.0]);
        let mut dx = vec![1.0; 6 * d];
        scatter_add_rows(d, &[5, 0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut dx);
        assert_eq!(&dx[15..18], &[2.0, 3.0, 4.0]);
        assert_eq!(&dx[0..3], &[5.0, 6.0, 7.0]);
        assert!(dx[3..15].iter().all(|&g| g == 1.0));
    }

    #[test]
    fn scatter_add_is_the_backward_of_gather() {
        let (d, rows) = (4, [2u32, 0, 5]);
        let mut x = random(6 * d, 5);
        let r = random(rows.len() * d, 6);
        let mut dx = vec![0.0; x.len()];
        scatter_add_rows(d, &rows, &r, &mut dx);
        check("gather dx", &mut x, &dx, 100, 1e-7, |x| {
            let mut y = vec![0.0; rows.len() * d];
            gather_rows(d, &rows, x, &mut y);
            dot(&y, &r)
        });
    }

    #[test]
    #[should_panic]
    fn a_row_past_the_end_panics() {
        let mut y = vec![0.0f32; 2];
        gather_rows(2, &[3], &[0.0; 6], &mut y);
    }
}
