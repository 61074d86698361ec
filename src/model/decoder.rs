//! The segmentation decoder (fine-tuning): work in progress on branch wip-decoder.
use super::ModelConfig;
use super::layout::Builder;

/// Pushes the decoder's tensors (`decoder.*`) into the layout, in the reverse of their
/// forward order.
pub(crate) fn layout(_b: &mut Builder, _cfg: &ModelConfig) {}
