//! Intensity normalisation on the grid, from statistics of the foreground only (voxels inside
//! the source field of view above the foreground threshold): clip to the 0.5-99.5 percentiles,
//! then scale to [0, 1] (minmax) or to zero mean and unit variance (z-score).
use super::Normalise;
use super::foreground::exact_percentiles;

/// Lower and upper clip percentiles, as fractions.
pub const CLIP_LOW: f64 = 0.005;
pub const CLIP_HIGH: f64 = 0.995;

/// What normalisation found and used, kept for provenance.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntensityStats {
    /// Foreground threshold in source intensity units.
    pub threshold: f32,
    /// Foreground voxels on the grid.
    pub foreground_voxels: usize,
    /// The 0.5th and 99.5th percentiles inside the foreground (source units): the clip range.
    pub clip_low: f32,
    pub clip_high: f32,
    /// Mean and standard deviation of the clipped foreground (source units).
    pub mean: f32,
    pub std: f32,
}

/// Normalises `volume` in place. `in_fov[i]` says whether grid voxel i maps inside the
/// source; outside it takes the background value (0 for minmax, the clipped minimum's
/// z-score for z-score). Err when the foreground is empty or flat.
pub fn apply(
    volume: &mut [f32],
    in_fov: &[bool],
    threshold: f32,
    mode: Normalise,
) -> Result<IntensityStats, String> {
    let fg: Vec<f32> = volume
        .iter()
        .zip(in_fov)
        .filter(|&(&v, &inside)| inside && v > threshold)
        .map(|(&v, _)| v)
        .collect();
    let n = fg.len();
    if n < 10 {
        return Err(format!(
            "no foreground on the grid ({n} voxels above the threshold {threshold}): is the \
             image empty, or does the grid miss it?"
        ));
    }
    let [lo, hi] = exact_percentiles(&fg, [CLIP_LOW, CLIP_HIGH]).unwrap_or([0.0, 0.0]);
    if hi <= lo {
        return Err(format!(
            "flat foreground: the 0.5th and 99.5th percentiles are both {lo}"
        ));
    }
    let (mut sum, mut sum2) = (0.0f64, 0.0f64);
    for &v in &fg {
        let c = f64::from(v.clamp(lo, hi));
        sum += c;
        sum2 += c * c;
    }
    let mean = sum / n as f64;
    let std = (sum2 / n as f64 - mean * mean).max(0.0).sqrt();
    let stats = IntensityStats {
        threshold,
        foreground_voxels: n,
        clip_low: lo,
        clip_high: hi,
        mean: mean as f32,
        std: std as f32,
    };
    match mode {
        Normalise::Minmax => {
            let scale = 1.0 / (hi - lo);
            for (v, &inside) in volume.iter_mut().zip(in_fov) {
                *v = if inside {
                    ((*v - lo) * scale).clamp(0.0, 1.0)
                } else {
                    0.0
                };
            }
        }
        Normalise::Zscore => {
            if std <= 0.0 {
                return Err("flat foreground: zero standard deviation".into());
            }
            let (m, inv) = (mean as f32, (1.0 / std) as f32);
            let background = (lo - m) * inv;
            for (v, &inside) in volume.iter_mut().zip(in_fov) {
                *v = if inside {
                    (v.clamp(lo, hi) - m) * inv
                } else {
                    background
                };
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minmax_maps_the_clip_range_to_unit_interval_and_outside_fov_to_zero() {
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut fov = vec![true; 1000];
        fov[999] = false;
        let s = apply(&mut v, &fov, 99.5, Normalise::Minmax).expect("normalises");
        assert_eq!(s.foreground_voxels, 899);
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        assert_eq!(v[999], 0.0);
        assert_eq!(v[0], 0.0);
        let mid = (500.0 - s.clip_low) / (s.clip_high - s.clip_low);
        assert!((v[500] - mid).abs() < 1e-6);
    }

    #[test]
    fn flat_image_is_an_error() {
        let mut v = vec![5.0f32; 100];
        let fov = vec![true; 100];
        assert!(apply(&mut v, &fov, 1.0, Normalise::Minmax).is_err());
    }
}
