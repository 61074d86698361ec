//! How model code finds its tensors in the one flat parameter buffer (and the gradient
//! buffer of the same layout): by layout name, through [`ParamIndex`], with helpers that hand
//! out views without fighting the borrow checker.
use crate::backend::Backend;
use std::ops::Range;

/// Where each named tensor lives in the flat buffers. Implemented by the layout table, and by
/// the trainer's wrapper that starts all-reduces while backward runs (train/overlap.rs).
pub trait ParamIndex {
    /// The range of `name`; the layout is fixed by the config, so a missing name is a bug.
    fn range_of(&self, name: &str) -> Range<usize>;

    /// Told by [`view_mut`] and [`two_mut`] (model code writes nothing but gradients) just
    /// before backward writes the gradient at `offset`: backward finishes gradients in layout
    /// order, so every gradient below `offset` is complete for the current pass.
    fn gradients_below<B: Backend>(&self, _be: &B, _grads: &B::Buf, _offset: usize) {}

    /// Said by an objective just before the step's last backward pass: from then on a
    /// gradient that is complete for the pass is final for the step.
    fn last_pass(&self) {}
}

/// The whole of a buffer, read-only.
pub fn all<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> B::View<'a> {
    be.view(buf, 0..be.len(buf))
}

/// The whole of a buffer, writable.
pub fn all_mut<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> B::ViewMut<'a> {
    let len = be.len(buf);
    be.view_mut(buf, 0..len)
}

/// A read-only view of tensor `name`.
pub fn view<'a, B: Backend>(
    be: &B,
    buf: &'a B::Buf,
    idx: &impl ParamIndex,
    name: &str,
) -> B::View<'a> {
    be.view(buf, idx.range_of(name))
}

/// A writable view of the gradient of tensor `name` in `buf` (see
/// [`ParamIndex::gradients_below`]).
pub fn view_mut<'a, B: Backend>(
    be: &B,
    buf: &'a mut B::Buf,
    idx: &impl ParamIndex,
    name: &str,
) -> B::ViewMut<'a> {
    let r = idx.range_of(name);
    idx.gradients_below(be, buf, r.start);
    be.view_mut(buf, r)
}

/// Writable views of two gradients at once (e.g. a norm's gamma and beta gradients).
pub fn two_mut<'a, B: Backend>(
    be: &B,
    buf: &'a mut B::Buf,
    idx: &impl ParamIndex,
    first: &str,
    second: &str,
) -> (B::ViewMut<'a>, B::ViewMut<'a>) {
    let (r1, r2) = (idx.range_of(first), idx.range_of(second));
    idx.gradients_below(be, buf, r1.start.min(r2.start));
    if r1.end <= r2.start {
        let whole = be.view_mut(buf, r1.start..r2.end);
        let (a, rest) = be.split_mut(whole, r1.len());
        let (_, rest) = be.split_mut(rest, r2.start - r1.end);
        let (b, _) = be.split_mut(rest, r2.len());
        (a, b)
    } else {
        assert!(r2.end <= r1.start, "tensors {first} and {second} overlap");
        let (b, a) = two_mut(be, buf, idx, second, first);
        (a, b)
    }
}
