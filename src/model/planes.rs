//! The three planes of a volume `[X][Y][Z]` (C order, z fastest) as batches of 2-D slices
//! (PAPER.md): axial `vol[:, :, k]` (Z slices of X x Y), sagittal `vol[k, :, :]` (X slices of
//! Y x Z), coronal `vol[:, k, :]` (Y slices of X x Z).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plane {
    Axial,
    Sagittal,
    Coronal,
}

impl Plane {
    /// The planes, in the order of the plane embedding's rows.
    pub const ALL: [Plane; 3] = [Plane::Axial, Plane::Sagittal, Plane::Coronal];

    /// Row of the plane embedding.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Plane::Axial => "axial",
            Plane::Sagittal => "sagittal",
            Plane::Coronal => "coronal",
        }
    }

    /// (slices, slice height, slice width) for a grid.
    pub fn geometry(self, [x, y, z]: [usize; 3]) -> (usize, usize, usize) {
        match self {
            Plane::Axial => (z, x, y),
            Plane::Sagittal => (x, y, z),
            Plane::Coronal => (y, x, z),
        }
    }

    /// Appends the slices of `vol` to `out` as `[slices, h, w]`.
    pub fn extract(self, vol: &[f32], grid: [usize; 3], out: &mut Vec<f32>) {
        let [gx, gy, gz] = grid;
        assert_eq!(vol.len(), gx * gy * gz, "volume does not match the grid");
        let at = |x: usize, y: usize, z: usize| vol[(x * gy + y) * gz + z];
        match self {
            Plane::Axial => {
                for k in 0..gz {
                    for x in 0..gx {
                        out.extend((0..gy).map(|y| at(x, y, k)));
                    }
                }
            }
            Plane::Sagittal => out.extend_from_slice(vol),
            Plane::Coronal => {
                for k in 0..gy {
                    for x in 0..gx {
                        out.extend_from_slice(&vol[(x * gy + k) * gz..(x * gy + k + 1) * gz]);
                    }
                }
            }
        }
    }

    /// The inverse of [`Plane::extract`]: writes `slices [slices, h, w]` of this plane back
    /// into `vol` (C order, z fastest).
    pub fn insert(self, slices: &[f32], grid: [usize; 3], vol: &mut [f32]) {
        let [gx, gy, gz] = grid;
        assert!(
            vol.len() == gx * gy * gz && slices.len() == vol.len(),
            "slices and volume do not match the grid"
        );
        let mut next = slices.iter().copied();
        let mut put = |i: usize| vol[i] = next.next().unwrap_or(f32::NAN);
        match self {
            Plane::Axial => {
                for k in 0..gz {
                    for x in 0..gx {
                        (0..gy).for_each(|y| put((x * gy + y) * gz + k));
                    }
                }
            }
            Plane::Sagittal => (0..gx * gy * gz).for_each(put),
            Plane::Coronal => {
                for k in 0..gy {
                    for x in 0..gx {
                        (0..gz).for_each(|z| put((x * gy + k) * gz + z));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_where_the_paper_says() {
        let grid = [3, 4, 5];
        let vol: Vec<f32> = (0..60).map(|i| i as f32).collect();
        let at = |x: usize, y: usize, z: usize| vol[(x * 4 + y) * 5 + z];
        for plane in Plane::ALL {
            let (n, h, w) = plane.geometry(grid);
            let mut out = Vec::new();
            plane.extract(&vol, grid, &mut out);
            assert_eq!(out.len(), n * h * w);
            for s in 0..n {
                for i in 0..h {
                    for j in 0..w {
                        let want = match plane {
                            Plane::Axial => at(i, j, s),
                            Plane::Sagittal => at(s, i, j),
                            Plane::Coronal => at(i, s, j),
                        };
                        assert_eq!(out[(s * h + i) * w + j], want, "{plane:?} {s} {i} {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn insert_inverts_extract() {
        let grid = [3, 4, 5];
        let vol: Vec<f32> = (0..60).map(|i| i as f32).collect();
        for plane in Plane::ALL {
            let mut slices = Vec::new();
            plane.extract(&vol, grid, &mut slices);
            let mut back = vec![-1.0; 60];
            plane.insert(&slices, grid, &mut back);
            assert_eq!(back, vol, "{plane:?}");
        }
    }
}
