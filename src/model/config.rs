//! Model presets (PAPER.md's table is the only source of these numbers) and the shapes that
//! follow from them: slices per plane, feature-map sizes through the encoder, masked positions,
//! and the rule deciding which corpus grids a preset can read.
use super::planes::Plane;
use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A named model size (PAPER.md, "Our presets").
#[derive(ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The paper's model on the 2 mm 96x114x96 grid.
    Paper,
    /// The paper's networks on a 3 mm 64x76x64 grid.
    Small,
    /// A few-thousand-parameter model on a 6 mm 32x38x32 grid, for tests.
    Tiny,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Paper, Preset::Small, Preset::Tiny];

    /// The lower-case name used on the command line, in TOML and in checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Small => "small",
            Preset::Tiny => "tiny",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The slices of one plane of a volume `vol[x, y, z]` (C order, z fastest):
/// axial `vol[:, :, k]` is an image `[h, w] = [X, Y]`, sagittal `vol[k, :, :]` is `[Y, Z]`,
/// coronal `vol[:, k, :]` is `[X, Z]`; `count` slices, `k` running along the remaining axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneShape {
    pub plane: Plane,
    pub count: usize,
    pub h: usize,
    pub w: usize,
}

/// Everything that fixes the model's shapes, plus the options the paper leaves open.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub preset: Preset,
    /// Voxels along x, y, z of the corpus this model reads.
    pub grid: [usize; 3],
    /// Voxel size in millimetres of that corpus.
    pub spacing: f64,
    /// Encoder stage widths; each stage has two BasicBlocks.
    pub widths: Vec<usize>,
    /// Output channels of the stem convolution (= `widths[0]`).
    pub stem_width: usize,
    /// Width of the slice vectors and of the transformer.
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_width: usize,
    /// Hidden width of the transformer's feed-forward block.
    pub ffn: usize,
    /// Epsilon of every instance and layer norm.
    pub norm_eps: f32,
    /// Dropout probability in the transformer (default 0; the paper used 0.1). Masks are keyed
    /// by (seed, epoch, subject, purpose), so runs with dropout stay reproducible.
    pub dropout: f32,
    /// Base of the sinusoidal position code.
    pub pos_base: f64,
    /// One sequence over the three planes instead of one per plane (the paper's choice is one
    /// per plane).
    pub joint_sequence: bool,
    /// Train the encoder during MEVP too (targets detached); experimental.
    pub trainable_encoder_in_mevp: bool,
}

impl ModelConfig {
    /// The preset's shapes with the default options.
    pub fn preset(preset: Preset) -> Self {
        // PAPER.md, "Our presets": grid (spacing) | widths | D | layers | heads x width | FFN.
        let (grid, spacing, widths, d, heads, head_width, ffn) = match preset {
            Preset::Paper => ([96, 114, 96], 2.0, vec![16, 32, 64, 128], 64, 4, 256, 128),
            Preset::Small => ([64, 76, 64], 3.0, vec![16, 32, 64, 128], 64, 4, 256, 128),
            Preset::Tiny => ([32, 38, 32], 6.0, vec![8, 16, 32], 32, 2, 32, 64),
        };
        let stem_width = widths[0];
        Self {
            preset,
            grid,
            spacing,
            widths,
            stem_width,
            d,
            layers: 1,
            heads,
            head_width,
            ffn,
            norm_eps: 1e-5,
            dropout: 0.0,
            pos_base: 10000.0,
            joint_sequence: false,
            trainable_encoder_in_mevp: false,
        }
    }

    /// Width of the last encoder stage (the input of `encoder.fc`).
    pub fn last_width(&self) -> usize {
        self.widths.last().copied().unwrap_or(self.stem_width)
    }

    /// Q, K and V each project D to `heads * head_width`.
    pub fn attn_width(&self) -> usize {
        self.heads * self.head_width
    }

    /// The three planes' slice shapes for a grid, in [`Plane::ALL`] order.
    pub fn planes_of(grid: [usize; 3]) -> [PlaneShape; 3] {
        Plane::ALL.map(|plane| {
            let (count, h, w) = plane.geometry(grid);
            PlaneShape { plane, count, h, w }
        })
    }

    /// This model's planes (from its grid).
    pub fn planes(&self) -> [PlaneShape; 3] {
        Self::planes_of(self.grid)
    }

    /// Slices per subject over the three planes (306 for the paper grid).
    pub fn slices_per_subject(&self) -> usize {
        self.planes().iter().map(|p| p.count).sum()
    }

    /// Feature-map size `(name, h, w)` after each encoder layer for an `h x w` slice: the stem
    /// conv (7x7 stride 2 pad 3), the max-pool (3x3 stride 2 pad 1), then each stage (stride 2
    /// in block 1 of stages 2 and later, 3x3 pad 1 and the 1x1 skip giving the same size).
    pub fn encoder_sizes(&self, h: usize, w: usize) -> Vec<(String, usize, usize)> {
        // The encoder's own shape plan, so this can never disagree with the forward pass.
        let spec = crate::model::encoder::EncoderSpec {
            widths: self.widths.clone(),
            d: self.d,
            eps: self.norm_eps,
        };
        let plan = crate::model::encoder::Plan::new(&spec, 1, h, w);
        let named = |name: String, (h, w): (usize, usize)| (name, h, w);
        let mut out = vec![
            named("stem.conv".into(), plan.stem.out_hw()),
            named("stem.pool".into(), plan.pool.out_hw()),
        ];
        for (s, stage) in plan.blocks.chunks(2).enumerate() {
            if let Some(last) = stage.last() {
                out.push(named(format!("s{}", s + 1), last.conv2.out_hw()));
            }
        }
        out
    }

    /// The smallest feature map an instance norm sees for this grid: `(plane, h, w)` of the
    /// deepest stage, for the plane whose shorter side is shortest there (then the fewest
    /// values), so a 1x8 map counts as smaller than a 2x2 one.
    pub fn smallest_norm_map(&self, grid: [usize; 3]) -> (Plane, usize, usize) {
        Self::planes_of(grid)
            .into_iter()
            .filter_map(|p| {
                let &(_, h, w) = self.encoder_sizes(p.h, p.w).last()?;
                Some((p.plane, h, w))
            })
            .min_by_key(|&(_, h, w)| (h.min(w), h * w))
            .unwrap_or((Plane::Axial, 0, 0))
    }

    /// Whether a corpus on `grid` with voxel size `spacing` mm can be read by this model:
    /// PAPER.md's rule (the grid is the preset's, and every instance norm normalises at least
    /// 2x2 values) plus the same voxel size. The error names both grids.
    pub fn check_grid(&self, corpus_grid: [usize; 3], corpus_spacing: f64) -> Result<()> {
        let show = |g: [usize; 3], s: f64| format!("{}x{}x{} ({s} mm)", g[0], g[1], g[2]);
        let ours = show(self.grid, self.spacing);
        let theirs = show(corpus_grid, corpus_spacing);
        let hint = match Preset::ALL.into_iter().find(|&p| {
            let c = ModelConfig::preset(p);
            c.grid == corpus_grid && (c.spacing - corpus_spacing).abs() < 1e-6
        }) {
            Some(p) => format!("use --preset {p}"),
            None => format!(
                "repack the corpus with --grid {},{},{} --spacing {}",
                self.grid[0], self.grid[1], self.grid[2], self.spacing
            ),
        };
        let (plane, h, w) = self.smallest_norm_map(corpus_grid);
        if h < 2 || w < 2 {
            bail!(
                "corpus grid {theirs} is too small for preset {}: the deepest {} feature map \
would be {h}x{w}, and every instance norm needs at least 2x2 values (preset grid {ours}); {hint}",
                self.preset,
                plane.name()
            );
        }
        if corpus_grid != self.grid || (corpus_spacing - self.spacing).abs() > 1e-6 {
            bail!(
                "corpus grid {theirs} does not match preset {}'s grid {ours}; {hint}",
                self.preset
            );
        }
        Ok(())
    }

    /// Masked positions per plane for MEVP: floor(fraction x slices), in [`Plane::ALL`] order
    /// (9, 9, 11 for the paper grid at 0.1).
    pub fn masked_per_plane(&self, fraction: f64) -> [usize; 3] {
        // The small epsilon keeps products like 0.7 x 10 = 6.999... from losing a position.
        self.planes()
            .map(|p| (fraction * p.count as f64 + 1e-9).floor().max(0.0) as usize)
    }

    /// Parameters of the encoder and of the transformer (padding excluded).
    pub fn param_counts(&self) -> (usize, usize) {
        let layout = crate::model::Layout::new(self);
        (
            layout.param_count(crate::model::Part::Encoder),
            layout.param_count(crate::model::Part::Transformer),
        )
    }

    /// Checks the configuration for values no model can have (hand-edited TOML in a
    /// checkpoint, options out of range).
    pub fn validate(&self) -> Result<()> {
        if self.widths.is_empty() || self.widths.contains(&0) {
            bail!(
                "model widths {:?} must be non-empty and positive",
                self.widths
            );
        }
        if self.stem_width != self.widths[0] {
            bail!(
                "stem_width {} must equal the first stage width {}",
                self.stem_width,
                self.widths[0]
            );
        }
        // The bound keeps a damaged or hand-edited configuration (read from a checkpoint)
        // from asking for an absurd buffer before any tensor is compared.
        const LIMIT: usize = 1 << 16;
        for (name, v) in [
            ("d", self.d),
            ("layers", self.layers),
            ("heads", self.heads),
            ("head_width", self.head_width),
            ("ffn", self.ffn),
            (
                "widest stage",
                self.widths.iter().copied().max().unwrap_or(0),
            ),
            ("stage count", self.widths.len()),
        ] {
            if v == 0 || v > LIMIT {
                bail!("model {name} = {v} must be between 1 and {LIMIT}");
            }
        }
        let total = crate::model::Layout::new(self).param_total();
        if total > 1 << 31 {
            bail!("model has {total} parameters, more than this tool handles (2^31)");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout {} must be in [0, 1)", self.dropout);
        }
        if !(self.pos_base.is_finite() && self.pos_base > 1.0) {
            bail!("pos_base {} must be a finite number above 1", self.pos_base);
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("norm_eps {} must be positive", self.norm_eps);
        }
        self.check_grid(self.grid, self.spacing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_planes_match_the_paper() {
        let c = ModelConfig::preset(Preset::Paper);
        let p = c.planes();
        assert_eq!((p[0].count, p[0].h, p[0].w), (96, 96, 114));
        assert_eq!((p[1].count, p[1].h, p[1].w), (96, 114, 96));
        assert_eq!((p[2].count, p[2].h, p[2].w), (114, 96, 96));
        assert_eq!(c.slices_per_subject(), 306);
        assert_eq!(c.masked_per_plane(0.1), [9, 9, 11]);
    }

    #[test]
    fn encoder_sizes_halve_with_ceiling() {
        let c = ModelConfig::preset(Preset::Paper);
        let sizes: Vec<(usize, usize)> = c
            .encoder_sizes(96, 114)
            .iter()
            .map(|s| (s.1, s.2))
            .collect();
        assert_eq!(
            sizes,
            vec![(48, 57), (24, 29), (24, 29), (12, 15), (6, 8), (3, 4)]
        );
        let names: Vec<String> = c.encoder_sizes(8, 8).into_iter().map(|s| s.0).collect();
        assert_eq!(names, ["stem.conv", "stem.pool", "s1", "s2", "s3", "s4"]);
    }

    #[test]
    fn every_preset_reads_its_own_grid_and_only_that() {
        for p in Preset::ALL {
            let c = ModelConfig::preset(p);
            c.validate().unwrap();
            let (_, h, w) = c.smallest_norm_map(c.grid);
            assert!(h >= 2 && w >= 2, "{p}: {h}x{w}");
            assert_eq!(Preset::from_name(p.name()), Some(p));
        }
        // small and tiny sit exactly at the 2x2 limit on the coronal plane.
        let small = ModelConfig::preset(Preset::Small);
        assert_eq!(small.smallest_norm_map(small.grid), (Plane::Coronal, 2, 2));
        let tiny = ModelConfig::preset(Preset::Tiny);
        assert_eq!(tiny.smallest_norm_map(tiny.grid), (Plane::Coronal, 2, 2));
    }

    #[test]
    fn wrong_grids_are_refused_naming_both() {
        let paper = ModelConfig::preset(Preset::Paper);
        let e = paper.check_grid([64, 76, 64], 3.0).unwrap_err().to_string();
        assert!(
            e.contains("64x76x64 (3 mm)") && e.contains("96x114x96 (2 mm)"),
            "{e}"
        );
        assert!(e.contains("--preset small"), "{e}");
        let e = paper
            .check_grid([96, 114, 96], 3.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("repack"), "{e}");
        let tiny = ModelConfig::preset(Preset::Tiny);
        let e = tiny.check_grid([16, 19, 16], 12.0).unwrap_err().to_string();
        assert!(e.contains("at least 2x2") && e.contains("1x1"), "{e}");
        assert!(e.contains("32x38x32 (6 mm)"), "{e}");
        // A long thin grid: the sagittal and coronal maps are 1 voxel high.
        let e = tiny.check_grid([32, 38, 12], 6.0).unwrap_err().to_string();
        assert!(e.contains("at least 2x2"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused_before_any_allocation() {
        let mut c = ModelConfig::preset(Preset::Paper);
        c.heads = 60_000;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("parameters"), "{e}");
        c.heads = 1 << 20;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("heads"), "{e}");
    }

    #[test]
    fn presets_round_trip_through_toml() {
        for p in Preset::ALL {
            let c = ModelConfig::preset(p);
            let text = toml::to_string(&c).unwrap();
            assert!(text.contains(&format!("preset = \"{p}\"")), "{text}");
            let back: ModelConfig = toml::from_str(&text).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn masked_positions_floor() {
        let c = ModelConfig::preset(Preset::Tiny);
        assert_eq!(c.masked_per_plane(0.1), [3, 3, 3]);
        assert_eq!(c.masked_per_plane(0.5), [16, 16, 19]);
    }
}
