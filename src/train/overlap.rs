//! Gradient all-reduce overlapped with backward. The trainable part of the gradient buffer is
//! cut into buckets in layout order; backward finishes gradients in that order, and during
//! the step's last backward pass (the only one after which a gradient is final: every plane
//! and both triplet branches add into the same weights) each bucket goes to the reduction
//! thread as soon as backward has moved past it. [`Overlap`] is the [`ParamIndex`] the
//! objectives see: it answers like the layout and listens to backward's progress.
use crate::backend::Backend;
use crate::dist::CommThread;
use crate::model::layout::Layout;
use crate::model::params::ParamIndex;
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Instant;

/// What one step's reduction cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommTimes {
    /// Seconds the reduction thread spent in MPI.
    pub comm_s: f64,
    /// Seconds the step waited for it after backward (the rest was hidden behind backward;
    /// the wait also holds any time the slowest rank took longer).
    pub exposed_s: f64,
    /// Buckets sent while backward still ran.
    pub early: usize,
}

/// `part` cut into consecutive buckets of at most `size` values.
pub fn buckets(part: Range<usize>, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    (part.start..part.end)
        .step_by(size)
        .map(|s| s..(s + size).min(part.end))
        .collect()
}

/// The buckets of one step in flight.
struct Flight {
    buckets: Vec<Range<usize>>,
    /// First bucket not sent yet.
    next: usize,
    /// Whether some value this rank sent was NaN or infinite.
    non_finite: bool,
}

/// The layout, plus the all-reduce of the step's gradient bucket by bucket.
pub struct Overlap<'a> {
    layout: &'a Layout,
    comm: &'a CommThread,
    armed: Cell<bool>,
    flight: RefCell<Flight>,
}

impl<'a> Overlap<'a> {
    /// Ready for one step whose trainable gradients are `part`, in buckets of at most
    /// `bucket` values.
    pub fn new(
        layout: &'a Layout,
        comm: &'a CommThread,
        part: Range<usize>,
        bucket: usize,
    ) -> Self {
        Overlap {
            layout,
            comm,
            armed: Cell::new(false),
            flight: RefCell::new(Flight {
                buckets: buckets(part, bucket),
                next: 0,
                non_finite: false,
            }),
        }
    }

    /// Sends every unsent bucket that ends at or below `offset`.
    fn send_below<B: Backend>(&self, be: &B, grads: &B::Buf, offset: usize) {
        let mut f = self.flight.borrow_mut();
        while f.next < f.buckets.len() && f.buckets[f.next].end <= offset {
            let r = f.buckets[f.next].clone();
            let mut host = vec![0.0f32; r.len()];
            be.download(be.view(grads, r), &mut host);
            f.non_finite |= host.iter().any(|x| !x.is_finite());
            self.comm.send(f.next, host);
            f.next += 1;
        }
    }

    /// After backward: sends what is left, waits for every bucket and writes the sums over
    /// ranks back into `grads`. Returns whether this rank's own gradient had a non-finite
    /// value (checked before it was mixed with the others) and the times.
    pub fn finish<B: Backend>(&self, be: &B, grads: &mut B::Buf) -> (bool, CommTimes) {
        let early = self.flight.borrow().next;
        self.send_below(be, grads, usize::MAX);
        let t = Instant::now();
        let f = self.flight.borrow();
        let mut comm_s = 0.0;
        for _ in 0..f.buckets.len() {
            let (id, sum, secs) = self.comm.recv();
            comm_s += secs;
            let r = f.buckets[id].clone();
            let staged = be.upload(&sum);
            be.copy(be.view(&staged, 0..r.len()), be.view_mut(grads, r));
        }
        let times = CommTimes {
            comm_s,
            exposed_s: t.elapsed().as_secs_f64(),
            early,
        };
        (f.non_finite, times)
    }
}

impl ParamIndex for Overlap<'_> {
    fn range_of(&self, name: &str) -> Range<usize> {
        self.layout.range_of(name)
    }

    fn gradients_below<B: Backend>(&self, be: &B, grads: &B::Buf, offset: usize) {
        if self.armed.get() {
            self.send_below(be, grads, offset);
        }
    }

    fn last_pass(&self) {
        self.armed.set(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_part_in_order() {
        assert_eq!(buckets(10..25, 6), vec![10..16, 16..22, 22..25]);
        assert_eq!(buckets(0..4, 4), vec![0..4]);
        assert!(buckets(5..5, 3).is_empty());
    }
}
