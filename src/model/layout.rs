//! THE parameter layout: every tensor's name, shape and offset in the one flat f32 buffer that
//! holds parameters (and, with the same offsets, gradients and Adam moments). Checkpoint
//! dataset names, per-tensor test tolerances and gradient buckets all derive from this table.
//!
//! Order: the reverse of the forward pass, so that backward finishes gradients in buffer order
//! (a later issue all-reduces them in buckets as they finish). The transformer comes first,
//! then the encoder, so each [`Part`] is one contiguous range. A fine-tuning model adds its
//! task [`Head`] in front of the transformer (backward reaches the head first).
use crate::model::ModelConfig;
use crate::model::config::Preset;
use anyhow::{Result, anyhow};
use std::collections::HashMap;
use std::ops::Range;

/// Offsets are multiples of this many floats (64 bytes: one cache line, and aligned for SIMD
/// and for GPU vector loads).
pub const ALIGN: usize = 16;

/// Which network a tensor belongs to; each part is contiguous in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// A downstream task's head (fine-tuning only): first in the buffer.
    Head,
    /// The slice encoder: trained by the triplet stage.
    Encoder,
    /// The transformer: trained by MEVP.
    Transformer,
}

impl Part {
    /// In buffer order.
    pub const ALL: [Part; 3] = [Part::Head, Part::Transformer, Part::Encoder];

    pub fn name(self) -> &'static str {
        match self {
            Part::Head => "head",
            Part::Encoder => "encoder",
            Part::Transformer => "transformer",
        }
    }
}

/// What a tensor is, which decides its initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Convolution weight `[cout, cin, k, k]`, no bias.
    Conv,
    NormGamma,
    NormBeta,
    /// Linear weight `[out, in]` (PyTorch's layout).
    LinearWeight,
    LinearBias,
    Embedding,
}

/// One tensor of the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    /// Start in the flat buffer, a multiple of [`ALIGN`].
    pub offset: usize,
    /// Number of values (product of `shape`).
    pub len: usize,
    pub part: Part,
    pub kind: Kind,
}

impl Entry {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }

    /// Inputs feeding one output value: `cin * k * k` for a convolution, `in` for a linear
    /// weight, the row width otherwise.
    pub fn fan_in(&self) -> usize {
        self.shape[1..].iter().product::<usize>().max(1)
    }
}

/// The task head a fine-tuning model carries in front of the pretrained networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// One logit from the pooled tokens (binary diagnosis): `head.fc [1, 3D]`.
    Classify,
    /// One value from the pooled tokens (standardised brain age): `head.fc [1, 3D]`.
    Regress,
    /// The per-slice segmentation decoder (`decoder.*`, model/decoder.rs).
    Segment,
}

impl Head {
    pub const ALL: [Head; 3] = [Head::Classify, Head::Regress, Head::Segment];

    /// The name checkpoints store (attribute `head`).
    pub fn name(self) -> &'static str {
        match self {
            Head::Classify => "classify",
            Head::Regress => "regress",
            Head::Segment => "segment",
        }
    }

    pub fn from_name(name: &str) -> Option<Head> {
        Head::ALL.into_iter().find(|h| h.name() == name)
    }
}

/// The table for one model configuration.
#[derive(Clone, Debug)]
pub struct Layout {
    preset: Preset,
    head: Option<Head>,
    entries: Vec<Entry>,
    total: usize,
    index: HashMap<String, usize>,
}

/// Collects entries in layout order, assigning aligned offsets.
pub(crate) struct Builder {
    entries: Vec<Entry>,
    next: usize,
    part: Part,
}

impl Builder {
    pub(crate) fn push(&mut self, name: String, shape: Vec<usize>, kind: Kind) {
        let len = shape.iter().product();
        self.entries.push(Entry {
            name,
            shape,
            offset: self.next,
            len,
            part: self.part,
            kind,
        });
        self.next = (self.next + len).next_multiple_of(ALIGN);
    }

    pub(crate) fn norm(&mut self, prefix: &str, width: usize) {
        self.push(format!("{prefix}.gamma"), vec![width], Kind::NormGamma);
        self.push(format!("{prefix}.beta"), vec![width], Kind::NormBeta);
    }

    pub(crate) fn linear(&mut self, prefix: &str, out: usize, inp: usize) {
        self.push(
            format!("{prefix}.weight"),
            vec![out, inp],
            Kind::LinearWeight,
        );
        self.push(format!("{prefix}.bias"), vec![out], Kind::LinearBias);
    }

    pub(crate) fn conv(&mut self, name: String, cout: usize, cin: usize, k: usize) {
        self.push(name, vec![cout, cin, k, k], Kind::Conv);
    }
}

impl Layout {
    /// The pretraining model: transformer and encoder.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self::build(cfg, None)
    }

    /// A fine-tuning model: `head` in front of the pretrained networks, whose tensors keep
    /// their names (so a pretraining checkpoint loads by name).
    pub fn with_head(cfg: &ModelConfig, head: Head) -> Self {
        Self::build(cfg, Some(head))
    }

    fn build(cfg: &ModelConfig, head: Option<Head>) -> Self {
        let mut b = Builder {
            entries: Vec::new(),
            next: 0,
            part: Part::Head,
        };
        match head {
            None => {}
            Some(Head::Classify | Head::Regress) => {
                b.linear("head.fc", 1, 3 * cfg.d);
            }
            Some(Head::Segment) => super::decoder::layout(&mut b, cfg),
        }
        b.part = Part::Transformer;
        let (d, aw) = (cfg.d, cfg.attn_width());
        b.norm("transformer.final_ln", d);
        for l in (1..=cfg.layers).rev() {
            let p = format!("transformer.l{l}");
            b.linear(&format!("{p}.ffn.fc2"), d, cfg.ffn);
            b.linear(&format!("{p}.ffn.fc1"), cfg.ffn, d);
            b.norm(&format!("{p}.ln2"), d);
            b.linear(&format!("{p}.attn.out"), d, aw);
            for qkv in ["v", "k", "q"] {
                b.linear(&format!("{p}.attn.{qkv}"), aw, d);
            }
            b.norm(&format!("{p}.ln1"), d);
        }
        b.push(
            "transformer.plane_embedding".into(),
            vec![3, d],
            Kind::Embedding,
        );

        b.part = Part::Encoder;
        b.linear("encoder.fc", d, cfg.last_width());
        for s in (1..=cfg.widths.len()).rev() {
            let w = cfg.widths[s - 1];
            let cin = if s == 1 {
                cfg.stem_width
            } else {
                cfg.widths[s - 2]
            };
            for blk in [2, 1] {
                let p = format!("encoder.s{s}.b{blk}");
                let block_in = if blk == 1 { cin } else { w };
                if blk == 1 && s >= 2 {
                    b.norm(&format!("{p}.down.norm"), w);
                    b.conv(format!("{p}.down.conv"), w, cin, 1);
                }
                b.norm(&format!("{p}.norm2"), w);
                b.conv(format!("{p}.conv2"), w, w, 3);
                b.norm(&format!("{p}.norm1"), w);
                b.conv(format!("{p}.conv1"), w, block_in, 3);
            }
        }
        b.norm("encoder.stem.norm", cfg.stem_width);
        b.conv("encoder.stem.conv".into(), cfg.stem_width, 1, 7);

        let index = b
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Self {
            preset: cfg.preset,
            head,
            total: b.next,
            entries: b.entries,
            index,
        }
    }

    /// The preset this layout was built for.
    pub fn preset(&self) -> Preset {
        self.preset
    }

    /// The task head, for a fine-tuning model.
    pub fn head(&self) -> Option<Head> {
        self.head
    }

    /// Entries in buffer order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// Length of the flat buffer (a multiple of [`ALIGN`]; padding between tensors stays 0).
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The buffer range of tensor `name`; an unknown name is an error naming it.
    pub fn range(&self, name: &str) -> Result<Range<usize>> {
        self.get(name)
            .map(Entry::range)
            .ok_or_else(|| anyhow!("no tensor '{name}' in the {} parameter layout", self.preset))
    }

    /// The buffer range holding one part, padding included (empty for a part the layout
    /// does not have).
    pub fn part_range(&self, part: Part) -> Range<usize> {
        let Some(start) = self
            .entries
            .iter()
            .find(|e| e.part == part)
            .map(|e| e.offset)
        else {
            return 0..0;
        };
        let end = self
            .entries
            .iter()
            .rposition(|e| e.part == part)
            .and_then(|i| self.entries.get(i + 1))
            .map_or(self.total, |next| next.offset);
        start..end
    }

    /// Parameters in one part, padding excluded.
    pub fn param_count(&self, part: Part) -> usize {
        self.entries
            .iter()
            .filter(|e| e.part == part)
            .map(|e| e.len)
            .sum()
    }

    /// Parameters in the whole model, padding excluded.
    pub fn param_total(&self) -> usize {
        self.entries.iter().map(|e| e.len).sum()
    }

    /// Tensor `name` within a flat buffer laid out by this table.
    pub fn slice<'a>(&self, buf: &'a [f32], name: &str) -> Result<&'a [f32]> {
        let r = self.range(name)?;
        buf.get(r).ok_or_else(|| {
            anyhow!(
                "buffer of {} values is shorter than the layout ({})",
                buf.len(),
                self.total
            )
        })
    }

    /// Tensor `name` within a flat buffer laid out by this table, mutably.
    pub fn slice_mut<'a>(&self, buf: &'a mut [f32], name: &str) -> Result<&'a mut [f32]> {
        let r = self.range(name)?;
        let n = buf.len();
        buf.get_mut(r).ok_or_else(|| {
            anyhow!(
                "buffer of {n} values is shorter than the layout ({})",
                self.total
            )
        })
    }
}

impl<'a> IntoIterator for &'a Layout {
    type Item = &'a Entry;
    type IntoIter = std::slice::Iter<'a, Entry>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

impl crate::model::params::ParamIndex for Layout {
    fn range_of(&self, name: &str) -> Range<usize> {
        match self.get(name) {
            Some(e) => e.range(),
            // Names come from the model code and the layout built from the same config.
            None => panic!("layout has no tensor '{name}' (model code and layout disagree)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts() -> Vec<Layout> {
        Preset::ALL
            .into_iter()
            .map(|p| Layout::new(&ModelConfig::preset(p)))
            .collect()
    }

    #[test]
    fn entries_are_aligned_disjoint_increasing_and_fit() {
        for l in layouts() {
            let mut end = 0;
            for e in l.iter() {
                assert_eq!(e.offset % ALIGN, 0, "{}", e.name);
                assert!(e.offset >= end, "{} overlaps its predecessor", e.name);
                assert!(
                    e.offset - end < ALIGN,
                    "{}: gap larger than padding",
                    e.name
                );
                assert_eq!(e.len, e.shape.iter().product::<usize>());
                assert!(e.len > 0);
                end = e.offset + e.len;
            }
            assert_eq!(l.total(), end.next_multiple_of(ALIGN));
            assert_eq!(l.total() % ALIGN, 0);
            assert_eq!(l.index.len(), l.entries().len(), "duplicate names");
            for e in l.iter() {
                assert_eq!(l.get(&e.name), Some(e));
                assert_eq!(l.range(&e.name).unwrap(), e.range());
            }
            assert!(l.range("encoder.nope").is_err());
        }
    }

    #[test]
    fn parts_are_contiguous_transformer_first() {
        for l in layouts() {
            let t = l.part_range(Part::Transformer);
            let e = l.part_range(Part::Encoder);
            assert_eq!(t.start, 0);
            assert_eq!(t.end, e.start);
            assert_eq!(e.end, l.total());
            for en in l.iter() {
                let r = l.part_range(en.part);
                assert!(
                    r.start <= en.offset && en.offset + en.len <= r.end,
                    "{}",
                    en.name
                );
            }
            let first_enc = l.iter().position(|e| e.part == Part::Encoder).unwrap();
            assert!(
                l.entries()[..first_enc]
                    .iter()
                    .all(|e| e.part == Part::Transformer)
            );
            assert!(
                l.entries()[first_enc..]
                    .iter()
                    .all(|e| e.part == Part::Encoder)
            );
        }
    }

    // Counted by hand from PAPER.md (conv weights cout*cin*k*k, norms 2*w, linears
    // out*in + out).
    // paper encoder: stem 16*49 + 32 = 816; s1 2*(2*16*16*9 + 64) = 9344;
    //   s2 (32*16*9 + 32*32*9 + 32*16 + 3*64) + (2*32*32*9 + 128) = 14528 + 18560 = 33088;
    //   s3 (64*32*9 + 64*64*9 + 64*32 + 3*128) + (2*64*64*9 + 256) = 57728 + 73984 = 131712;
    //   s4 (128*64*9 + 128*128*9 + 128*64 + 3*256) + (2*128*128*9 + 512)
    //      = 230144 + 295424 = 525568;
    //   fc 64*128 + 64 = 8256; total 708784 (small: the same networks).
    // paper transformer: plane 3*64 = 192; layer: ln1 + ln2 2*128,
    //   q/k/v 3*(1024*64 + 1024) = 199680, out 64*1024 + 64 = 65600,
    //   fc1 128*64 + 128 = 8320, fc2 64*128 + 64 = 8256 -> 282112; final ln 128; total 282432.
    // tiny encoder: stem 8*49 + 16 = 408; s1 2*(2*8*8*9 + 32) = 2368;
    //   s2 (16*8*9 + 16*16*9 + 16*8 + 3*32) + (2*16*16*9 + 64) = 3680 + 4672 = 8352;
    //   s3 14528 + 18560 = 33088; fc 32*32 + 32 = 1056; total 45272.
    // tiny transformer: plane 96; layer 2*64 + 3*(64*32 + 64) + (32*64 + 32) + (64*32 + 64)
    //   + (32*64 + 32) = 12736; final 64; total 12896.
    #[test]
    fn parameter_counts_match_the_hand_count() {
        let want = [
            (Preset::Paper, 708_784, 282_432),
            (Preset::Small, 708_784, 282_432),
            (Preset::Tiny, 45_272, 12_896),
        ];
        for (p, enc, tr) in want {
            let cfg = ModelConfig::preset(p);
            let l = Layout::new(&cfg);
            println!(
                "{p}: encoder {} + transformer {} = {} parameters, buffer {} floats",
                l.param_count(Part::Encoder),
                l.param_count(Part::Transformer),
                l.param_total(),
                l.total()
            );
            assert_eq!(l.param_count(Part::Encoder), enc, "{p} encoder");
            assert_eq!(l.param_count(Part::Transformer), tr, "{p} transformer");
            assert_eq!(cfg.param_counts(), (enc, tr));
        }
    }

    /// The tiny model's modules written out by hand in forward order: the layout must list
    /// them in reverse, each module's tensors as gamma/beta or weight/bias.
    #[test]
    fn layout_is_the_reverse_of_the_forward_order() {
        let one = |n: &str| vec![n.to_string()];
        let norm = |p: &str| vec![format!("{p}.gamma"), format!("{p}.beta")];
        let lin = |p: &str| vec![format!("{p}.weight"), format!("{p}.bias")];
        let mut modules = vec![one("encoder.stem.conv"), norm("encoder.stem.norm")];
        for s in 1..=3 {
            for b in 1..=2 {
                let p = format!("encoder.s{s}.b{b}");
                modules.push(one(&format!("{p}.conv1")));
                modules.push(norm(&format!("{p}.norm1")));
                modules.push(one(&format!("{p}.conv2")));
                modules.push(norm(&format!("{p}.norm2")));
                if b == 1 && s >= 2 {
                    modules.push(one(&format!("{p}.down.conv")));
                    modules.push(norm(&format!("{p}.down.norm")));
                }
            }
        }
        modules.push(lin("encoder.fc"));
        modules.push(one("transformer.plane_embedding"));
        modules.push(norm("transformer.l1.ln1"));
        for x in ["q", "k", "v", "out"] {
            modules.push(lin(&format!("transformer.l1.attn.{x}")));
        }
        modules.push(norm("transformer.l1.ln2"));
        modules.push(lin("transformer.l1.ffn.fc1"));
        modules.push(lin("transformer.l1.ffn.fc2"));
        modules.push(norm("transformer.final_ln"));
        let want: Vec<String> = modules.into_iter().rev().flatten().collect();
        let l = Layout::new(&ModelConfig::preset(Preset::Tiny));
        let names: Vec<&str> = l.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, want);
        assert_eq!(names.len(), 19 + 47);
    }

    #[test]
    fn later_layers_and_stages_come_first() {
        let mut cfg = ModelConfig::preset(Preset::Paper);
        cfg.layers = 3;
        let l = Layout::new(&cfg);
        let at = |n: &str| l.get(n).unwrap().offset;
        assert!(at("transformer.l3.ffn.fc2.weight") < at("transformer.l2.ffn.fc2.weight"));
        assert!(at("transformer.l2.attn.q.bias") < at("transformer.l1.ln2.gamma"));
        assert!(at("transformer.l1.ln1.beta") < at("transformer.plane_embedding"));
        assert!(at("encoder.s4.b1.conv1") < at("encoder.s3.b2.norm2.gamma"));
        assert_eq!(l.entries().last().unwrap().name, "encoder.stem.conv");
        assert_eq!(
            l.get("encoder.s2.b1.down.conv").unwrap().shape,
            [32, 16, 1, 1]
        );
        assert_eq!(l.get("encoder.s1.b1.conv1").unwrap().shape, [16, 16, 3, 3]);
        assert_eq!(
            l.get("transformer.l1.attn.out.weight").unwrap().shape,
            [64, 1024]
        );
        assert!(l.get("encoder.s1.b1.down.conv").is_none());
    }
}
