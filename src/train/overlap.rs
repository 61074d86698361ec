//! Gradient all-reduce overlapped with backward. The trainable part of the gradient buffer is
//! cut into buckets in layout order; backward finishes gradients in that order, and during
//! the step's last backward pass (the only one after which a gradient is final: every plane
//! and both triplet branches add into the same weights) each bucket is handed to the run's
//! [`BucketReduce`] as soon as backward has moved past it. [`Overlap`] is the [`ParamIndex`]
//! the objectives see: it answers like the layout and listens to backward's progress.
//!
//! How a bucket is summed is the reducer's business, chosen once per run (train/grad_comm.rs):
//! [`HostStaged`] downloads it and hands it to the MPI reduction thread (every backend), the
//! NCCL reducer (backend/cuda/nccl.rs, feature `nccl`) sums it in device memory on its own
//! CUDA stream.
use crate::backend::Backend;
use crate::dist::{CommThread, World};
use crate::model::layout::Layout;
use crate::model::params::ParamIndex;
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Instant;
/// What one step's reduction cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommTimes {
    /// Seconds spent summing (MPI on the reduction thread, or NCCL on its stream).
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

/// What [`BucketReduce::finish`] reports for one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reduced {
    /// Whether some value of this rank's own gradient was NaN or infinite, checked before it
    /// was mixed with the other ranks' (so the culprit can be named).
    pub non_finite: bool,
    /// Seconds spent summing.
    pub comm_s: f64,
    /// Seconds `finish` waited for the sums.
    pub exposed_s: f64,
}

/// Sums gradient buckets over ranks. One reducer serves a whole run; every rank starts the
/// same buckets in the same order, then calls `finish` once per step.
pub trait BucketReduce {
    /// Starts summing bucket `id`, the values `range` of `grads`, which backward will not
    /// write again this step. Ids count from 0 in each step.
    fn start<B: Backend>(&self, be: &B, grads: &B::Buf, id: usize, range: Range<usize>);

    /// Waits until every bucket of the step (`buckets`, all started, in id order) is summed
    /// and leaves the sums over ranks in `grads`.
    fn finish<B: Backend>(&self, be: &B, grads: &mut B::Buf, buckets: &[Range<usize>]) -> Reduced;
}

/// Host staging: each bucket is downloaded, checked, and summed by MPI on the reduction
/// thread ([`CommThread`]); the sums are uploaded back. Works for every backend.
pub struct HostStaged {
    comm: CommThread,
    /// Whether a value this rank sent in the current step was NaN or infinite.
    non_finite: Cell<bool>,
}

impl HostStaged {
    /// Over `world` (None for a world of one, where there is nothing to sum).
    pub fn new(world: &World) -> Option<Self> {
        world.comm_thread().map(|comm| HostStaged {
            comm,
            non_finite: Cell::new(false),
        })
    }
}

impl BucketReduce for HostStaged {
    fn start<B: Backend>(&self, be: &B, grads: &B::Buf, id: usize, range: Range<usize>) {
        let mut host = vec![0.0f32; range.len()];
        be.download(be.view(grads, range), &mut host);
        if host.iter().any(|x| !x.is_finite()) {
            self.non_finite.set(true);
        }
        self.comm.send(id, host);
    }

    fn finish<B: Backend>(&self, be: &B, grads: &mut B::Buf, buckets: &[Range<usize>]) -> Reduced {
        let t = Instant::now();
        let mut comm_s = 0.0;
        for _ in 0..buckets.len() {
            let (id, sum, secs) = self.comm.recv();
            comm_s += secs;
            let r = buckets[id].clone();
            let staged = be.upload(&sum);
            be.copy(be.view(&staged, 0..r.len()), be.view_mut(grads, r));
        }
        Reduced {
            non_finite: self.non_finite.replace(false),
            comm_s,
            exposed_s: t.elapsed().as_secs_f64(),
        }
    }
}

/// The buckets of one step in flight.
struct Flight {
    buckets: Vec<Range<usize>>,
    /// First bucket not sent yet.
    next: usize,
}

/// The layout, plus the all-reduce of the step's gradient bucket by bucket.
pub struct Overlap<'a, R: BucketReduce> {
    layout: &'a Layout,
    reduce: &'a R,
    armed: Cell<bool>,
    flight: RefCell<Flight>,
}

impl<'a, R: BucketReduce> Overlap<'a, R> {
    /// Ready for one step whose trainable gradients are `part`, in buckets of at most
    /// `bucket` values.
    pub fn new(layout: &'a Layout, reduce: &'a R, part: Range<usize>, bucket: usize) -> Self {
        Overlap {
            layout,
            reduce,
            armed: Cell::new(false),
            flight: RefCell::new(Flight {
                buckets: buckets(part, bucket),
                next: 0,
            }),
        }
    }

    /// Starts every unsent bucket that ends at or below `offset`.
    fn send_below<B: Backend>(&self, be: &B, grads: &B::Buf, offset: usize) {
        let mut f = self.flight.borrow_mut();
        while f.next < f.buckets.len() && f.buckets[f.next].end <= offset {
            let r = f.buckets[f.next].clone();
            self.reduce.start(be, grads, f.next, r);
            f.next += 1;
        }
    }

    /// After backward: starts what is left, waits for every bucket and leaves the sums over
    /// ranks in `grads`. Returns whether this rank's own gradient had a non-finite value
    /// (checked before it was mixed with the others) and the times.
    pub fn finish<B: Backend>(&self, be: &B, grads: &mut B::Buf) -> (bool, CommTimes) {
        let early = self.flight.borrow().next;
        self.send_below(be, grads, usize::MAX);
        let f = self.flight.borrow();
        let r = self.reduce.finish(be, grads, &f.buckets);
        let times = CommTimes {
            comm_s: r.comm_s,
            exposed_s: r.exposed_s,
            early,
        };
        (r.non_finite, times)
    }
}

impl<R: BucketReduce> ParamIndex for Overlap<'_, R> {
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
    use crate::backend::cpu::Cpu;
    use crate::model::layout::Part;
    use crate::model::objective::{self, Net};
    use crate::model::{ModelConfig, Preset, init};

    /// A started bucket: its id, its range and what it held then.
    type Started = (usize, Range<usize>, Vec<f32>);

    /// A reducer for a pretend world of two identical ranks: remembers what each bucket held
    /// when it was started, and "sums" by doubling.
    #[derive(Default)]
    struct Recorder {
        started: RefCell<Vec<Started>>,
        finished: Cell<usize>,
    }

    impl BucketReduce for Recorder {
        fn start<B: Backend>(&self, be: &B, grads: &B::Buf, id: usize, range: Range<usize>) {
            assert_eq!(self.finished.get(), 0, "a bucket started after finish");
            let mut host = vec![0.0f32; range.len()];
            be.download(be.view(grads, range.clone()), &mut host);
            self.started.borrow_mut().push((id, range, host));
        }

        fn finish<B: Backend>(
            &self,
            be: &B,
            grads: &mut B::Buf,
            buckets: &[Range<usize>],
        ) -> Reduced {
            self.finished.set(self.finished.get() + 1);
            assert_eq!(self.started.borrow().len(), buckets.len());
            for r in buckets {
                be.scale(2.0, be.view_mut(grads, r.clone()));
            }
            Reduced {
                non_finite: true,
                comm_s: 0.25,
                exposed_s: 0.5,
            }
        }
    }

    #[test]
    fn buckets_start_once_in_order_as_soon_as_final_and_come_back_summed() {
        let cfg = ModelConfig::preset(Preset::Tiny);
        let layout = Layout::new(&cfg);
        let net = Net::new(&cfg);
        let params = init::init_params(&layout, 3);
        let per: usize = cfg.grid.iter().product();
        let anchors: Vec<f32> = (0..2 * per)
            .map(|i| 0.5 + 0.4 * ((i as f32) * 0.37).sin())
            .collect();
        let positives: Vec<f32> = anchors.iter().map(|x| x * x).collect();
        let part = layout.part_range(Part::Encoder);
        let mut reference = vec![0.0f32; layout.total()];
        objective::triplet(
            &Cpu,
            &net,
            &params,
            Some(&mut reference),
            &layout,
            &anchors,
            &positives,
            2,
            1.0,
        );
        assert!(reference[part.clone()].iter().any(|&x| x != 0.0));
        let rec = Recorder::default();
        let bucket = part.len() / 7 + 1;
        let overlap = Overlap::new(&layout, &rec, part.clone(), bucket);
        let mut grads = vec![0.0f32; layout.total()];
        objective::triplet(
            &Cpu,
            &net,
            &params,
            Some(&mut grads),
            &overlap,
            &anchors,
            &positives,
            2,
            1.0,
        );
        let (bad, times) = overlap.finish(&Cpu, &mut grads);
        assert!(bad);
        assert_eq!((times.comm_s, times.exposed_s), (0.25, 0.5));
        let started = rec.started.borrow();
        let expected = buckets(part.clone(), bucket);
        assert_eq!(started.len(), expected.len());
        // Backward finishes gradients in layout order, so most buckets leave before it ends.
        assert!(
            times.early > 0 && times.early <= expected.len(),
            "{}",
            times.early
        );
        for (k, (id, range, held)) in started.iter().enumerate() {
            assert_eq!((*id, range), (k, &expected[k]));
            // A bucket is started only once its gradient is final.
            assert_eq!(held[..], reference[range.clone()], "bucket {k}");
        }
        for i in 0..layout.total() {
            let want = if part.contains(&i) {
                2.0 * reference[i]
            } else {
                reference[i]
            };
            assert_eq!(grads[i], want, "value {i}");
        }
    }

    #[test]
    fn buckets_cover_the_part_in_order() {
        assert_eq!(buckets(10..25, 6), vec![10..16, 16..22, 22..25]);
        assert_eq!(buckets(0..4, 4), vec![0..4]);
        assert!(buckets(5..5, 3).is_empty());
    }
}
