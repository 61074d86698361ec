//! Mid-plane montages of a packed subject for `inspect --png`: axial, sagittal and coronal
//! slices side by side in grayscale, the segmentation blended in colour, encoded as PNG.
//! People check preprocessing by looking, so the orientation rules are fixed and printed.
use anyhow::{Context, Result, bail};

/// The display convention, printed with every montage.
pub const CONVENTION: &str = "neurological convention (subject's left on the image left: axial \
viewed from above, coronal from behind); anterior up in axial, superior up in sagittal and \
coronal, anterior to the right in sagittal";
/// Each voxel becomes SCALE x SCALE pixels (nearest neighbour), so 2 mm grids stay visible.
pub const SCALE: usize = 2;
/// Black pixels between panels (after scaling).
const GAP: usize = 4;
const ALPHA: f32 = 0.5;

/// An 8-bit RGB image, rows top to bottom.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Overlay colour of a BraTS label: 1 necrotic core red, 2 oedema green, 4 enhancing yellow;
/// any other non-zero label magenta so it is not missed.
pub fn label_colour(label: u8) -> Option<[u8; 3]> {
    match label {
        0 => None,
        1 => Some([255, 0, 0]),
        2 => Some([0, 255, 0]),
        4 => Some([255, 255, 0]),
        _ => Some([255, 0, 255]),
    }
}

/// Where each panel starts (x offset in pixels before scaling is applied to widths) and its
/// size in voxels: axial X x Y, sagittal Y x Z, coronal X x Z.
fn panel_sizes(grid: [usize; 3]) -> [(usize, usize); 3] {
    let [x, y, z] = grid;
    [(x, y), (y, z), (x, z)]
}

/// Image size of the montage for `grid`.
pub fn montage_size(grid: [usize; 3]) -> (usize, usize) {
    let panels = panel_sizes(grid);
    let width = panels.iter().map(|p| p.0 * SCALE).sum::<usize>() + 2 * GAP;
    let height = panels.iter().map(|p| p.1 * SCALE).max().unwrap_or(0);
    (width, height)
}

/// Renders the three mid-planes of `volume` ([X][Y][Z], z fastest, RAS) with `labels` blended
/// in. Intensities are windowed to the volume's 0.5-99.5 percentiles.
pub fn mid_planes(volume: &[f32], labels: Option<&[u8]>, grid: [usize; 3]) -> Result<RgbImage> {
    let [nx, ny, nz] = grid;
    let n = nx * ny * nz;
    if volume.len() != n || labels.is_some_and(|l| l.len() != n) {
        bail!("volume or labels do not match the grid {grid:?}");
    }
    let (lo, hi) = window(volume);
    let (width, height) = montage_size(grid);
    let mut img = RgbImage {
        width,
        height,
        pixels: vec![0; width * height * 3],
    };
    let idx = |x: usize, y: usize, z: usize| (x * ny + y) * nz + z;
    // Each panel maps (column, row) in voxels to a voxel index; rows count from the top.
    let axial = |c: usize, r: usize| idx(c, ny - 1 - r, nz / 2);
    let sagittal = |c: usize, r: usize| idx(nx / 2, c, nz - 1 - r);
    let coronal = |c: usize, r: usize| idx(c, ny / 2, nz - 1 - r);
    let samplers: [&dyn Fn(usize, usize) -> usize; 3] = [&axial, &sagittal, &coronal];
    let mut x0 = 0;
    for ((pw, ph), sample) in panel_sizes(grid).into_iter().zip(samplers) {
        let y0 = (height - ph * SCALE) / 2;
        for r in 0..ph {
            for c in 0..pw {
                let v = sample(c, r);
                let g = ((volume[v] - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0;
                let mut rgb = [g; 3];
                if let Some(colour) = labels.and_then(|l| label_colour(l[v])) {
                    for (o, c) in rgb.iter_mut().zip(colour) {
                        *o = (1.0 - ALPHA) * *o + ALPHA * f32::from(c);
                    }
                }
                let rgb = rgb.map(|v| v.round() as u8);
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        let p = ((y0 + r * SCALE + dy) * width + x0 + c * SCALE + dx) * 3;
                        img.pixels[p..p + 3].copy_from_slice(&rgb);
                    }
                }
            }
        }
        x0 += pw * SCALE + GAP;
    }
    Ok(img)
}

fn window(volume: &[f32]) -> (f32, f32) {
    let mut v: Vec<f32> = volume.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let mut pick = |q: f64| {
        let k = ((v.len() - 1) as f64 * q).round() as usize;
        *v.select_nth_unstable_by(k, f32::total_cmp).1
    };
    let (lo, hi) = (pick(0.005), pick(0.995));
    if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
}

/// PNG bytes of `img` (8-bit RGB).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let w = u32::try_from(img.width).context("image too wide")?;
    let h = u32::try_from(img.height).context("image too tall")?;
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().context("PNG header")?;
    writer.write_image_data(&img.pixels).context("PNG data")?;
    writer.finish().context("PNG end")?;
    Ok(bytes)
}
