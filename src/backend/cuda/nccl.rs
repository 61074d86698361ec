//! Gradient buckets summed by NCCL in GPU memory (feature `nccl`): the fast path of
//! train/grad_comm.rs for a world of CUDA ranks, each on a GPU of its own.
//!
//! One communicator per run: rank 0 makes the NCCL unique id, MPI broadcasts it (in a frame
//! that can also carry rank 0's failure, so nobody waits in `ncclCommInitRank` for a rank
//! that gave up), and each rank joins with its MPI rank, the world size and the GPU of its
//! backend. During the step's last backward pass each finished bucket is summed on the
//! reducer's own stream: the stream waits for an event recorded on the backend's stream
//! (backward has queued every write to the bucket by then), then `ncclAllReduce` reads the
//! bucket in place and writes the sum into a second buffer, so this rank's own gradient is
//! still there after backward to be checked for NaN/inf before anything is mixed. `finish`
//! checks it, waits for the reducer's stream, and copies the sums over the gradient on the
//! backend's stream.
//!
//! **Built, never run**: NCCL refuses two ranks on one GPU and the only GPU machine we have
//! holds one GPU, so nothing here has executed (docs/CUDA.md).
use super::{Cuda, ok};
use crate::backend::Backend;
use crate::dist::{Collective, World};
use crate::train::grad_comm::{self, NCCL_ID_BYTES};
use crate::train::overlap::{BucketReduce, Reduced};
use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys as ncclsys;
use std::cell::RefCell;
use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

// The id travels as NCCL_ID_BYTES bytes (grad_comm::id_frame): NCCL's type must agree.
const _: () = assert!(size_of::<ncclsys::ncclUniqueId>() == NCCL_ID_BYTES);

/// NCCL's own words for an error code.
fn describe(e: &NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any code.
    let text = unsafe {
        let p = ncclsys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    format!("{:?} ({text})", e.0)
}

/// A communicator, aborted when dropped (local and immediate; every collective the run
/// started has finished by then, or the job is ending anyway).
struct Communicator(ncclsys::ncclComm_t);

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: a communicator from ncclCommInitRank, dropped once.
        let _ = unsafe { nccl::comm_abort(self.0) };
    }
}

/// The receive buffer of the sums, indexed like the gradient buffer.
struct Sums {
    _slice: CudaSlice<f32>,
    base: u64,
    len: usize,
}

/// NCCL all-reduce of gradient buckets (see the module comment).
pub struct NcclReduce {
    comm: Communicator,
    /// The reducer's stream.
    stream: Arc<CudaStream>,
    /// The backend's stream, which computes the gradients and reads the sums.
    compute: Arc<CudaStream>,
    sums: RefCell<Option<Sums>>,
    /// Timing events around each bucket's all-reduce in the current step.
    timings: RefCell<Vec<(CudaEvent, CudaEvent)>>,
    version: String,
}

impl NcclReduce {
    /// Opens the run's communicator over `world` on `be`'s GPU. Collective: every rank calls
    /// it, after train/grad_comm.rs has checked that every rank has a GPU of its own and the
    /// library.
    pub fn open(world: &World, be: &Cuda) -> Result<Self> {
        let code = nccl::get_nccl_version().map_err(|e| anyhow::anyhow!(describe(&e)))?;
        let version = grad_comm::nccl_version_string(code);
        let mut frame = Vec::new();
        if world.is_root() {
            frame = match nccl::get_uniqueid() {
                Ok(id) => grad_comm::id_frame(Ok(&id.internal.map(|c| c as u8))),
                Err(e) => grad_comm::id_frame(Err(&describe(&e))),
            };
        }
        world.broadcast_bytes(&mut frame);
        // The frame is the same on every rank: so is this error.
        let id = grad_comm::read_id_frame(&frame)
            .map_err(|e| Collective::new(world, 1, format!("NCCL: {e:#}")))?;
        ok_or(be.ctx.bind_to_thread(), "binding the CUDA context")?;
        let stream = ok_or(be.ctx.new_stream(), "creating the NCCL stream")?;
        let id = ncclsys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let rank = i32::try_from(world.rank).context("rank")?;
        let ranks = i32::try_from(world.size).context("world size")?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful call; the current context is the
        // backend's, whose device NCCL takes for this rank.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), ranks, id, rank)
                .map_err(|e| anyhow::anyhow!("{}", describe(&e)))
                .with_context(|| {
                    format!(
                        "{}: ncclCommInitRank (NCCL {version}, GPU {})",
                        world.describe(),
                        be.info().ordinal
                    )
                })?;
            Communicator(comm.assume_init())
        };
        Ok(NcclReduce {
            comm,
            stream,
            compute: be.stream.clone(),
            sums: RefCell::new(None),
            timings: RefCell::new(Vec::new()),
            version,
        })
    }

    /// The library's version, e.g. "2.27.3".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The address of value `offset` of the sums for a gradient buffer of `total` values
    /// (allocated at the first bucket: the gradient buffer keeps its length for the run).
    fn sums_at(&self, offset: usize, total: usize) -> u64 {
        let mut sums = self.sums.borrow_mut();
        let s = sums.get_or_insert_with(|| {
            let slice = ok(
                self.compute.alloc_zeros::<f32>(total.max(1)),
                "allocating the NCCL sums",
            );
            let base = slice.device_ptr(&self.compute).0;
            Sums {
                _slice: slice,
                base,
                len: total,
            }
        });
        assert_eq!(
            s.len, total,
            "the gradient buffer changed length during the run"
        );
        s.base + (offset * size_of::<f32>()) as u64
    }
}

fn ok_or<T>(r: Result<T, cudarc::driver::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| what.to_string())
}

/// A device address from the backend, which must keep its buffers on the GPU.
fn address<B: Backend>(be: &B, v: B::View<'_>) -> u64 {
    be.device_address(v)
        .expect("NCCL gradients need the CUDA backend (chosen once per run in grad_comm.rs)")
}

impl BucketReduce for NcclReduce {
    fn start<B: Backend>(&self, be: &B, grads: &B::Buf, _id: usize, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        let src = address(be, be.view(grads, range.clone()));
        let dst = self.sums_at(range.start, be.len(grads));
        // Backward has queued every write to the bucket on the backend's stream.
        let ready = ok(
            self.compute.record_event(None),
            "recording a bucket's event",
        );
        ok(self.stream.wait(&ready), "waiting for a bucket");
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let begin = ok(self.stream.record_event(timed), "recording an event");
        // SAFETY: `src` holds range.len() values of the gradient, which backward no longer
        // writes this step; `dst` the same count inside the sums buffer; the stream and the
        // communicator are this rank's and live as long as `self`.
        let r = unsafe {
            nccl::all_reduce(
                src as *const c_void,
                dst as *mut c_void,
                range.len(),
                ncclsys::ncclDataType_t::ncclFloat32,
                ncclsys::ncclRedOp_t::ncclSum,
                self.comm.0,
                self.stream.cu_stream() as _,
            )
        };
        if let Err(e) = r {
            panic!(
                "ncclAllReduce of a gradient bucket failed: {}",
                describe(&e)
            );
        }
        let end = ok(self.stream.record_event(timed), "recording an event");
        self.timings.borrow_mut().push((begin, end));
    }

    fn finish<B: Backend>(&self, be: &B, grads: &mut B::Buf, buckets: &[Range<usize>]) -> Reduced {
        let (Some(first), Some(last)) = (buckets.first(), buckets.last()) else {
            return Reduced::default();
        };
        let part = first.start..last.end;
        // This rank's own gradient, unmixed: NCCL wrote the sums elsewhere. Reading it waits
        // for backward's tail on the backend's stream while NCCL goes on.
        let own = be.sum_squares(be.view(grads, part.clone()));
        let t = Instant::now();
        let done = ok(self.stream.record_event(None), "recording the last bucket");
        ok(done.synchronize(), "waiting for NCCL");
        let exposed_s = t.elapsed().as_secs_f64();
        let comm_s = self
            .timings
            .borrow_mut()
            .drain(..)
            .map(|(a, b)| f64::from(ok(a.elapsed_ms(&b), "timing a bucket")) / 1e3)
            .sum();
        let dst = address(be, be.view(grads, part.clone()));
        let src = self.sums_at(part.start, be.len(grads));
        ok(self.compute.wait(&done), "ordering the copy after NCCL");
        // SAFETY: both ranges hold part.len() values; queued on the backend's stream, so it
        // runs before anything later reads the gradient.
        ok(
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst,
                    src,
                    part.len() * size_of::<f32>(),
                    self.compute.cu_stream(),
                )
            },
            "copying the sums",
        );
        Reduced {
            non_finite: !own.is_finite(),
            comm_s,
            exposed_s,
        }
    }
}
