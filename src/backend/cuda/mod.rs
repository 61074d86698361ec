//! The CUDA backend: the [`Backend`] trait on one GPU through cudarc. Buffers are device
//! allocations; views are (address, length) pairs into them, cut by the same range
//! bookkeeping as the CPU backend's slices ([`plan::Span`]). GEMMs (linear layers, attention,
//! convolution as im2col + GEMM) go through cuBLAS, everything else through our kernels in
//! `kernels/*.cu`, compiled by NVRTC once per process for the device's compute capability.
//!
//! Everything runs on one stream, so stream order is the only synchronisation; cudarc's
//! per-buffer event tracking is switched off. Reductions that feed the weights use fixed
//! two-pass block reductions (no float atomics): two identical runs give identical bits.
//! A CUDA failure inside an op is a device fault or a bug: the op panics with the cause.
//! Which device to use (and whether there is one) is [`super::device`]'s job.
pub mod kernels;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod plan;

use super::{Adam, Attention, Backend, Conv2d, Gemm, Pool2d};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use plan::{ELEMENTWISE_THREADS, Span, WARPS_PER_BLOCK, grid_exact, grid_for};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// Options of the CUDA backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Let cuBLAS use TF32 tensor cores for f32 GEMMs (10-bit mantissa products, f32 sums):
    /// faster, and about 1e-3 relative error instead of 1e-6.
    pub tf32: bool,
}

/// What the backend runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (u32, u32),
    pub tf32: bool,
    /// The GPU's UUID, which tells two GPUs apart whatever CUDA_VISIBLE_DEVICES renumbers
    /// (None when the driver would not say).
    pub uuid: Option<[u8; 16]>,
}

/// An owned device buffer of f32. Zero-length buffers hold one unused element, so every
/// buffer has an address.
pub struct DeviceBuf {
    slice: CudaSlice<f32>,
    base: u64,
    len: usize,
}

/// A read-only view: `span` of the buffer at `base`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceView<'a> {
    base: u64,
    span: Span,
    _buf: PhantomData<&'a DeviceBuf>,
}

/// A writable view: `span` of the buffer at `base`. Views from `split_mut` never overlap.
#[derive(Debug)]
pub struct DeviceViewMut<'a> {
    base: u64,
    span: Span,
    _buf: PhantomData<&'a mut DeviceBuf>,
}

impl DeviceView<'_> {
    fn ptr(&self) -> u64 {
        self.span.address(self.base)
    }
    pub fn len(&self) -> usize {
        self.span.len
    }
    pub fn is_empty(&self) -> bool {
        self.span.len == 0
    }
    /// The part `range` of this view.
    fn part(self, range: Range<usize>) -> Self {
        DeviceView {
            span: self.span.part(range),
            ..self
        }
    }
}

impl DeviceViewMut<'_> {
    fn ptr(&self) -> u64 {
        self.span.address(self.base)
    }
    pub fn len(&self) -> usize {
        self.span.len
    }
    pub fn is_empty(&self) -> bool {
        self.span.len == 0
    }
    /// The part `range` of this view, for one call.
    fn part(&mut self, range: Range<usize>) -> DeviceViewMut<'_> {
        DeviceViewMut {
            base: self.base,
            span: self.span.part(range),
            _buf: PhantomData,
        }
    }
}

/// Scratch memory reused across calls (column matrices, partial sums, row indices). Stream
/// order makes reuse safe: a later kernel that overwrites it runs after the earlier reader.
#[derive(Default)]
struct Scratch {
    f32s: Option<CudaSlice<f32>>,
    f64s: Option<CudaSlice<f64>>,
    u32s: Option<CudaSlice<u32>>,
}

/// Grows `slot` to at least `len` values and returns its device address.
fn scratch_slot<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> u64 {
    let big_enough = slot.as_ref().is_some_and(|s| s.len() >= len.max(1));
    if !big_enough {
        // Grow by half again, so a slowly growing need does not reallocate every call.
        let want = len.max(1) + len / 2;
        *slot = Some(ok(stream.alloc_zeros::<T>(want), "allocating scratch"));
    }
    let s = slot.as_ref().expect("scratch just allocated");
    s.device_ptr(stream).0
}

/// Unwraps a CUDA result inside an op: a failure there is a device fault or a bug.
fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("CUDA backend: {what} failed: {e:?}"),
    }
}

/// PTX of every kernel file per compute capability, compiled once per process.
type PtxCache = Mutex<HashMap<(u32, u32), Arc<Vec<(&'static str, String)>>>>;

fn compiled_ptx(
    major: u32,
    minor: u32,
) -> Result<Arc<Vec<(&'static str, String)>>, kernels::KernelError> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = map.get(&(major, minor)) {
        return Ok(p.clone());
    }
    let mut out = Vec::new();
    for f in kernels::FILES {
        out.push((f.file, kernels::compile(f.file, f.source, major, minor)?));
    }
    let out = Arc::new(out);
    map.insert((major, minor), out.clone());
    Ok(out)
}

/// The CUDA backend on one device.
pub struct Cuda {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    scratch: Mutex<Scratch>,
    info: CudaInfo,
    ctx: Arc<CudaContext>,
}

/// Launches kernel `$name` with `$cfg` and the arguments in order. Every argument is bound
/// to a local first, so it outlives the launch that reads it.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let func = $self.function($name);
        let mut builder = $self.stream.launch_builder(func);
        $(
            let arg = $arg;
            builder.arg(&arg);
        )*
        // SAFETY: the arguments match the kernel's parameter list in kernels/*.cu (types and
        // order); device addresses come from live views whose lengths the caller checked.
        ok(unsafe { builder.launch($cfg) }, $name);
    }};
}

fn cfg_1d(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// A launch over `rows` rows of `cols` elements ([`plan::grid_2d`]).
fn rows_of(cols: usize, rows: usize) -> LaunchConfig {
    let ((gx, gy), threads) = plan::grid_2d(cols, rows);
    LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride elementwise launch over `len` values.
fn elementwise(len: usize) -> LaunchConfig {
    cfg_1d(grid_for(len, ELEMENTWISE_THREADS), ELEMENTWISE_THREADS, 0)
}

/// One block of [`kernels::REDUCE_THREADS`] per item.
fn per_block(items: usize) -> LaunchConfig {
    cfg_1d(grid_exact(items), kernels::REDUCE_THREADS, 0)
}

/// One warp per row, [`WARPS_PER_BLOCK`] rows per block.
fn per_warp(rows: usize) -> LaunchConfig {
    cfg_1d(
        grid_exact(rows.div_ceil(WARPS_PER_BLOCK as usize)),
        32 * WARPS_PER_BLOCK,
        0,
    )
}

fn i64_of(v: usize) -> i64 {
    i64::try_from(v).expect("length fits i64")
}

fn i32_of(v: usize, what: &str) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("{what} = {v} exceeds the kernels' 32-bit range"))
}

impl Cuda {
    /// The backend on device `ordinal`: creates a context and stream, compiles the kernels
    /// for the device (once per process) and a cuBLAS handle. Checks that the driver, NVRTC
    /// and cuBLAS libraries can be loaded before any call (cudarc panics otherwise).
    pub fn new(ordinal: usize, opts: CudaOptions) -> anyhow::Result<Self> {
        use anyhow::{Context, bail};
        // SAFETY: these only try to open the libraries.
        let (driver, nvrtc, cublas) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
            )
        };
        let hint = "HINT: the CUDA 13 libraries must be on LD_LIBRARY_PATH (on the GPU machine \
                    they are in Python's site-packages/nvidia/cu13/lib)";
        if !driver {
            bail!("no CUDA driver (libcuda.so) found on this machine: use --device cpu");
        }
        if !nvrtc {
            bail!("NVRTC (libnvrtc.so.13) not found, needed to compile the kernels. {hint}");
        }
        if !cublas {
            bail!("cuBLAS (libcublas.so.13) not found. {hint}");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .with_context(|| format!("opening CUDA device {ordinal}"))?;
        // SAFETY: one stream only; stream order is the synchronisation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("creating a CUDA stream")?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("reading the compute capability")?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let uuid = ctx.uuid().ok().map(|u| u.bytes.map(|b| b as u8));
        let (major, minor) = (major as u32, minor as u32);
        let ptx = compiled_ptx(major, minor)?;
        let mut functions = HashMap::new();
        for (f, (file, text)) in kernels::FILES.iter().zip(ptx.iter()) {
            debug_assert_eq!(f.file, *file);
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(text.clone()))
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .with_context(|| format!("loading the PTX of kernels/{file}"))?;
            for &k in f.kernels {
                let func = module
                    .load_function(k)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))
                    .with_context(|| format!("kernel {k} of kernels/{file}"))?;
                functions.insert(k, func);
            }
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("creating a cuBLAS handle")?;
        {
            use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
            let mode = if opts.tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: a live handle.
            let status = unsafe { cublasSetMathMode(*blas.handle(), mode) };
            if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                bail!("cublasSetMathMode failed: {status:?}");
            }
        }
        Ok(Cuda {
            stream,
            blas,
            functions,
            scratch: Mutex::new(Scratch::default()),
            info: CudaInfo {
                ordinal,
                name,
                compute_capability: (major, minor),
                tf32: opts.tf32,
                uuid,
            },
            ctx,
        })
    }

    pub fn info(&self) -> &CudaInfo {
        &self.info
    }

    /// Waits until every queued operation has finished (for timing).
    pub fn synchronize(&self) {
        ok(self.stream.synchronize(), "stream synchronize");
    }

    /// Makes the device's context current on the calling thread, for the raw driver and
    /// cuBLAS calls (cudarc's launches do this themselves).
    fn bind(&self) {
        ok(self.ctx.bind_to_thread(), "binding the CUDA context");
    }

    fn function(&self, name: &str) -> &CudaFunction {
        self.functions
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not in kernels::FILES"))
    }

    fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uploads row indices into the index scratch and returns their address.
    fn upload_rows(&self, sc: &mut Scratch, rows: &[u32]) -> u64 {
        let ptr = scratch_slot(&self.stream, &mut sc.u32s, rows.len());
        if !rows.is_empty() {
            self.bind();
            // SAFETY: the scratch holds at least rows.len() values; a pageable host source is
            // copied before the call returns.
            ok(
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(ptr, rows, self.stream.cu_stream())
                },
                "uploading row indices",
            );
        }
        ptr
    }

    /// `c = alpha op(a) op(b) + beta c` through cuBLAS on raw views.
    fn gemm_raw(&self, g: &Gemm, a: (u64, usize), b: (u64, usize), c: (u64, usize)) {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let p = match plan::blas_gemm(g, a.1, b.1, c.1) {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => panic!("{e}"),
        };
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        self.bind();
        // SAFETY: blas_gemm checked every operand against its view's length.
        let r = unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *self.blas.handle(),
                op(p.trans_first),
                op(p.trans_second),
                p.m,
                p.n,
                p.k,
                &g.alpha,
                b.0 as *const f32,
                p.ld_first,
                p.stride_first,
                a.0 as *const f32,
                p.ld_second,
                p.stride_second,
                &g.beta,
                c.0 as *mut f32,
                p.ldc,
                p.stride_c,
                p.batch,
            )
        };
        ok(r, "cublasSgemmStridedBatched");
    }

    /// `dst[j] += sum over rows of src[r, j]` for `src [rows, d]`, in a fixed order.
    fn column_sums_into(&self, rows: usize, d: usize, src: u64, dst: u64) {
        if rows == 0 || d == 0 {
            return;
        }
        let blocks = rows.div_ceil(plan::COL_ROWS_PER_BLOCK);
        let mut sc = self.scratch();
        let partials = scratch_slot(&self.stream, &mut sc.f64s, blocks * d);
        let threads = 128u32;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_exact(blocks),
                grid_exact(d.div_ceil(threads as usize)),
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "col_partials", cfg; src, i64_of(rows), i32_of(d, "d"),
            plan::COL_ROWS_PER_BLOCK as i32, partials);
        launch!(self, "col_finish", cfg_1d(grid_for(d, threads), threads, 0);
            partials, i32_of(blocks, "blocks"), i32_of(d, "d"), dst);
    }

    /// `loss[0] = scale * sum of partials[..n]` as f32.
    fn finish_loss(&self, partials: u64, n: usize, scale: f64, loss: u64) {
        launch!(self, "finish_loss", cfg_1d(1, kernels::REDUCE_THREADS, 0);
            partials, i64_of(n), scale, loss);
    }

    fn fill_raw(&self, ptr: u64, len: usize, value: f32) {
        if len > 0 {
            launch!(self, "fill", elementwise(len); ptr, i64_of(len), value);
        }
    }
}

fn same_len(a: usize, b: usize, what: &str) {
    assert_eq!(a, b, "{what}: lengths {a} and {b} differ");
}

impl Backend for Cuda {
    type Buf = DeviceBuf;
    type View<'a> = DeviceView<'a>;
    type ViewMut<'a> = DeviceViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn zeros(&self, len: usize) -> DeviceBuf {
        let slice = ok(
            self.stream.alloc_zeros::<f32>(len.max(1)),
            "allocating a buffer",
        );
        let base = slice.device_ptr(&self.stream).0;
        DeviceBuf { slice, base, len }
    }

    fn upload(&self, host: &[f32]) -> DeviceBuf {
        let slice = if host.is_empty() {
            ok(self.stream.alloc_zeros::<f32>(1), "allocating a buffer")
        } else {
            ok(self.stream.clone_htod(host), "uploading a buffer")
        };
        let base = slice.device_ptr(&self.stream).0;
        DeviceBuf {
            slice,
            base,
            len: host.len(),
        }
    }

    fn download(&self, buf: DeviceView<'_>, host: &mut [f32]) {
        let n = buf.len().min(host.len());
        self.bind();
        if n > 0 {
            // SAFETY: the view holds at least n values; synchronised before returning.
            ok(
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut host[..n],
                        buf.ptr(),
                        self.stream.cu_stream(),
                    )
                },
                "downloading",
            );
        }
        self.synchronize();
    }

    fn scalar(&self, v: DeviceView<'_>) -> f64 {
        assert!(!v.is_empty(), "scalar of an empty view");
        let mut x = [0.0f32];
        self.download(v.part(0..1), &mut x);
        f64::from(x[0])
    }

    fn len(&self, buf: &DeviceBuf) -> usize {
        debug_assert!(buf.slice.len() >= buf.len);
        buf.len
    }

    fn view<'a>(&self, buf: &'a DeviceBuf, range: Range<usize>) -> DeviceView<'a> {
        DeviceView {
            base: buf.base,
            span: Span::whole(buf.len).part(range),
            _buf: PhantomData,
        }
    }

    fn view_mut<'a>(&self, buf: &'a mut DeviceBuf, range: Range<usize>) -> DeviceViewMut<'a> {
        DeviceViewMut {
            base: buf.base,
            span: Span::whole(buf.len).part(range),
            _buf: PhantomData,
        }
    }

    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        let (a, b) = v.span.split(mid);
        let part = |span| DeviceViewMut {
            base: v.base,
            span,
            _buf: PhantomData,
        };
        (part(a), part(b))
    }

    fn as_view<'a, 'b>(&self, v: &'b DeviceViewMut<'a>) -> DeviceView<'b>
    where
        'a: 'b,
    {
        DeviceView {
            base: v.base,
            span: v.span,
            _buf: PhantomData,
        }
    }

    fn reborrow_mut<'a, 'b>(&self, v: &'b mut DeviceViewMut<'a>) -> DeviceViewMut<'b>
    where
        'a: 'b,
    {
        DeviceViewMut {
            base: v.base,
            span: v.span,
            _buf: PhantomData,
        }
    }

    fn fill(&self, x: DeviceViewMut<'_>, value: f32) {
        self.fill_raw(x.ptr(), x.len(), value);
    }

    fn copy(&self, src: DeviceView<'_>, dst: DeviceViewMut<'_>) {
        same_len(src.len(), dst.len(), "copy");
        if src.is_empty() {
            return;
        }
        self.bind();
        // SAFETY: both views hold src.len() values.
        ok(
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst.ptr(),
                    src.ptr(),
                    src.len() * std::mem::size_of::<f32>(),
                    self.stream.cu_stream(),
                )
            },
            "device copy",
        );
    }

    fn gemm(&self, g: &Gemm, a: DeviceView<'_>, b: DeviceView<'_>, c: DeviceViewMut<'_>) {
        self.gemm_raw(
            g,
            (a.ptr(), a.len()),
            (b.ptr(), b.len()),
            (c.ptr(), c.len()),
        );
    }

    fn conv2d_forward(
        &self,
        s: &Conv2d,
        x: DeviceView<'_>,
        w: DeviceView<'_>,
        y: DeviceViewMut<'_>,
    ) {
        plan::check_conv(s, x.len(), w.len(), y.len(), "conv forward");
        let (kk, p) = plan::conv_dims(s);
        if s.n == 0 || p == 0 || s.cout == 0 {
            return;
        }
        if s.cin == 0 {
            self.fill_raw(y.ptr(), y.len(), 0.0);
            return;
        }
        let (x_img, y_img) = (s.cin * s.h * s.w, s.cout * p);
        if plan::is_pointwise(s) {
            let g = plan::conv_forward_gemm(s, s.n);
            self.gemm_raw(
                &g,
                (w.ptr(), w.len()),
                (x.ptr(), x.len()),
                (y.ptr(), y.len()),
            );
            return;
        }
        let per_chunk = plan::images_per_chunk(s.n, kk * p, plan::COL_BUDGET);
        let mut sc = self.scratch();
        let col = scratch_slot(&self.stream, &mut sc.f32s, per_chunk * kk * p);
        let (ho, wo) = s.out_hw();
        let l = plan::col_per_image(s);
        for chunk in plan::image_chunks(s.n, per_chunk) {
            let imgs = chunk.len();
            let xc = x.part(chunk.start * x_img..chunk.end * x_img);
            launch!(self, "im2col", rows_of(p, imgs * kk);
                xc.ptr(), i32_of(imgs, "n"), i32_of(s.cin, "cin"), i32_of(s.h, "h"),
                i32_of(s.w, "w"), i32_of(s.k, "k"), i32_of(s.stride, "stride"),
                i32_of(s.pad, "pad"), i32_of(ho, "ho"), i32_of(wo, "wo"),
                i64_of(l.img_stride), i64_of(l.row_stride), col);
            let g = plan::conv_forward_gemm(s, imgs);
            let yc = y.span.part(chunk.start * y_img..chunk.end * y_img);
            self.gemm_raw(
                &g,
                (w.ptr(), w.len()),
                (col, imgs * kk * p),
                (yc.address(y.base), yc.len),
            );
        }
    }

    fn conv2d_backward_data(
        &self,
        s: &Conv2d,
        dy: DeviceView<'_>,
        w: DeviceView<'_>,
        dx: DeviceViewMut<'_>,
    ) {
        plan::check_conv(s, dx.len(), w.len(), dy.len(), "conv backward_data");
        let (kk, p) = plan::conv_dims(s);
        if s.n == 0 || s.cin == 0 || s.h * s.w == 0 {
            return;
        }
        if s.cout == 0 || p == 0 {
            self.fill_raw(dx.ptr(), dx.len(), 0.0);
            return;
        }
        if plan::is_pointwise(s) {
            let g = plan::conv_backward_data_gemm(s, s.n);
            self.gemm_raw(
                &g,
                (w.ptr(), w.len()),
                (dy.ptr(), dy.len()),
                (dx.ptr(), dx.len()),
            );
            return;
        }
        let (x_img, y_img) = (s.cin * s.h * s.w, s.cout * p);
        let per_chunk = plan::images_per_chunk(s.n, kk * p, plan::COL_BUDGET);
        let mut sc = self.scratch();
        let col = scratch_slot(&self.stream, &mut sc.f32s, per_chunk * kk * p);
        let (ho, wo) = s.out_hw();
        let l = plan::col_per_image(s);
        for chunk in plan::image_chunks(s.n, per_chunk) {
            let imgs = chunk.len();
            let dyc = dy.part(chunk.start * y_img..chunk.end * y_img);
            let g = plan::conv_backward_data_gemm(s, imgs);
            self.gemm_raw(
                &g,
                (w.ptr(), w.len()),
                (dyc.ptr(), dyc.len()),
                (col, imgs * kk * p),
            );
            let dxc = dx.span.part(chunk.start * x_img..chunk.end * x_img);
            launch!(self, "col2im", rows_of(s.h * s.w, imgs * s.cin);
                col, i32_of(imgs, "n"), i32_of(s.cin, "cin"), i32_of(s.h, "h"),
                i32_of(s.w, "w"), i32_of(s.k, "k"), i32_of(s.stride, "stride"),
                i32_of(s.pad, "pad"), i32_of(ho, "ho"), i32_of(wo, "wo"),
                i64_of(l.img_stride), i64_of(l.row_stride), dxc.address(dx.base));
        }
    }

    fn conv2d_backward_weight(
        &self,
        s: &Conv2d,
        x: DeviceView<'_>,
        dy: DeviceView<'_>,
        dw: DeviceViewMut<'_>,
    ) {
        plan::check_conv(s, x.len(), dw.len(), dy.len(), "conv backward_weight");
        let (kk, p) = plan::conv_dims(s);
        if s.n == 0 || p == 0 || dw.is_empty() {
            return;
        }
        let (x_img, y_img) = (s.cin * s.h * s.w, s.cout * p);
        // Per image: its columns and its permuted dy.
        let per_chunk = plan::images_per_chunk(s.n, (kk + s.cout) * p, plan::COL_BUDGET);
        let mut sc = self.scratch();
        let scratch = scratch_slot(&self.stream, &mut sc.f32s, per_chunk * (kk + s.cout) * p);
        let (ho, wo) = s.out_hw();
        for chunk in plan::image_chunks(s.n, per_chunk) {
            let imgs = chunk.len();
            let col = scratch;
            let dyt = Span {
                start: imgs * kk * p,
                len: 0,
            }
            .address(scratch);
            let l = plan::col_rows(s, imgs);
            let xc = x.part(chunk.start * x_img..chunk.end * x_img);
            launch!(self, "im2col", rows_of(p, imgs * kk);
                xc.ptr(), i32_of(imgs, "n"), i32_of(s.cin, "cin"), i32_of(s.h, "h"),
                i32_of(s.w, "w"), i32_of(s.k, "k"), i32_of(s.stride, "stride"),
                i32_of(s.pad, "pad"), i32_of(ho, "ho"), i32_of(wo, "wo"),
                i64_of(l.img_stride), i64_of(l.row_stride), col);
            let dyc = dy.part(chunk.start * y_img..chunk.end * y_img);
            launch!(self, "permute_nc", elementwise(imgs * y_img);
                dyc.ptr(), i32_of(imgs, "n"), i32_of(s.cout, "cout"), i64_of(p), dyt);
            let g = plan::conv_backward_weight_gemm(s, imgs);
            self.gemm_raw(
                &g,
                (dyt, s.cout * imgs * p),
                (col, kk * imgs * p),
                (dw.ptr(), dw.len()),
            );
        }
    }

    fn instance_norm_forward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        eps: f32,
        relu: bool,
        x: DeviceView<'_>,
        gamma: DeviceView<'_>,
        beta: DeviceView<'_>,
        y: DeviceViewMut<'_>,
        mean: DeviceViewMut<'_>,
        rstd: DeviceViewMut<'_>,
    ) {
        assert_eq!(x.len(), n * c * hw, "instance_forward: x length");
        assert_eq!(y.len(), n * c * hw, "instance_forward: y length");
        assert_eq!(gamma.len(), c, "instance_forward: gamma length");
        assert_eq!(beta.len(), c, "instance_forward: beta length");
        assert_eq!(mean.len(), n * c, "instance_forward: mean length");
        assert_eq!(rstd.len(), n * c, "instance_forward: rstd length");
        if hw == 0 || n * c == 0 {
            return;
        }
        launch!(self, "instance_norm_forward", per_block(n * c);
            x.ptr(), gamma.ptr(), beta.ptr(), i32_of(c, "c"), i64_of(hw), eps,
            i32::from(relu), y.ptr(), mean.ptr(), rstd.ptr());
    }

    fn instance_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        relu: bool,
        x: DeviceView<'_>,
        y: DeviceView<'_>,
        gamma: DeviceView<'_>,
        mean: DeviceView<'_>,
        rstd: DeviceView<'_>,
        dy: DeviceView<'_>,
        dx: DeviceViewMut<'_>,
        dgamma: DeviceViewMut<'_>,
        dbeta: DeviceViewMut<'_>,
    ) {
        let len = n * c * hw;
        for (v, what) in [
            (x.len(), "x"),
            (y.len(), "y"),
            (dy.len(), "dy"),
            (dx.len(), "dx"),
        ] {
            assert_eq!(v, len, "instance_backward: {what} length");
        }
        for (v, what) in [
            (gamma.len(), "gamma"),
            (dgamma.len(), "dgamma"),
            (dbeta.len(), "dbeta"),
        ] {
            assert_eq!(v, c, "instance_backward: {what} length");
        }
        assert_eq!(mean.len(), n * c, "instance_backward: mean length");
        assert_eq!(rstd.len(), n * c, "instance_backward: rstd length");
        if hw == 0 || n * c == 0 {
            return;
        }
        let mut sc = self.scratch();
        let sums = scratch_slot(&self.stream, &mut sc.f64s, 2 * n * c);
        launch!(self, "instance_norm_backward", per_block(n * c);
            x.ptr(), y.ptr(), gamma.ptr(), mean.ptr(), rstd.ptr(), dy.ptr(),
            i32_of(c, "c"), i64_of(hw), i32::from(relu), dx.ptr(), sums);
        launch!(self, "instance_norm_param_grads", cfg_1d(grid_for(c, 128), 128, 0);
            sums, i32_of(n, "n"), i32_of(c, "c"), dgamma.ptr(), dbeta.ptr());
    }

    fn layer_norm_forward(
        &self,
        rows: usize,
        d: usize,
        eps: f32,
        x: DeviceView<'_>,
        gamma: DeviceView<'_>,
        beta: DeviceView<'_>,
        y: DeviceViewMut<'_>,
        mean: DeviceViewMut<'_>,
        rstd: DeviceViewMut<'_>,
    ) {
        assert_eq!(x.len(), rows * d, "layer_forward: x length");
        assert_eq!(y.len(), rows * d, "layer_forward: y length");
        assert_eq!(gamma.len(), d, "layer_forward: gamma length");
        assert_eq!(beta.len(), d, "layer_forward: beta length");
        assert_eq!(mean.len(), rows, "layer_forward: mean length");
        assert_eq!(rstd.len(), rows, "layer_forward: rstd length");
        if d == 0 || rows == 0 {
            return;
        }
        launch!(self, "layer_norm_forward", per_warp(rows);
            x.ptr(), gamma.ptr(), beta.ptr(), i64_of(rows), i32_of(d, "d"), eps,
            y.ptr(), mean.ptr(), rstd.ptr());
    }

    fn layer_norm_backward(
        &self,
        rows: usize,
        d: usize,
        x: DeviceView<'_>,
        gamma: DeviceView<'_>,
        mean: DeviceView<'_>,
        rstd: DeviceView<'_>,
        dy: DeviceView<'_>,
        dx: DeviceViewMut<'_>,
        dgamma: DeviceViewMut<'_>,
        dbeta: DeviceViewMut<'_>,
    ) {
        assert_eq!(x.len(), rows * d, "layer_backward: x length");
        assert_eq!(dy.len(), rows * d, "layer_backward: dy length");
        assert_eq!(dx.len(), rows * d, "layer_backward: dx length");
        assert_eq!(gamma.len(), d, "layer_backward: gamma length");
        assert_eq!(dgamma.len(), d, "layer_backward: dgamma length");
        assert_eq!(dbeta.len(), d, "layer_backward: dbeta length");
        assert_eq!(mean.len(), rows, "layer_backward: mean length");
        assert_eq!(rstd.len(), rows, "layer_backward: rstd length");
        if d == 0 || rows == 0 {
            return;
        }
        let shared = 2 * d * std::mem::size_of::<f64>();
        assert!(
            shared <= 48 << 10,
            "layer_backward: d = {d} needs too much shared memory"
        );
        let blocks = rows.div_ceil(plan::LN_ROWS_PER_BLOCK);
        let mut sc = self.scratch();
        let partials = scratch_slot(&self.stream, &mut sc.f64s, 2 * blocks * d);
        let pbeta = partials + (blocks * d * std::mem::size_of::<f64>()) as u64;
        launch!(self, "layer_norm_backward", cfg_1d(grid_exact(blocks), 32, shared as u32);
            x.ptr(), gamma.ptr(), mean.ptr(), rstd.ptr(), dy.ptr(), i64_of(rows),
            i32_of(d, "d"), plan::LN_ROWS_PER_BLOCK as i32, dx.ptr(), partials, pbeta);
        let finish = cfg_1d(grid_for(d, 128), 128, 0);
        launch!(self, "col_finish", finish;
            partials, i32_of(blocks, "blocks"), i32_of(d, "d"), dgamma.ptr());
        launch!(self, "col_finish", finish;
            pbeta, i32_of(blocks, "blocks"), i32_of(d, "d"), dbeta.ptr());
    }

    fn relu_forward(&self, x: DeviceView<'_>, y: DeviceViewMut<'_>) {
        same_len(x.len(), y.len(), "relu_forward");
        if !x.is_empty() {
            launch!(self, "relu_forward", elementwise(x.len()); x.ptr(), i64_of(x.len()), y.ptr());
        }
    }

    fn relu_backward(&self, y: DeviceView<'_>, dy: DeviceView<'_>, dx: DeviceViewMut<'_>) {
        same_len(y.len(), dy.len(), "relu_backward");
        same_len(y.len(), dx.len(), "relu_backward");
        if !y.is_empty() {
            launch!(self, "relu_backward", elementwise(y.len());
                y.ptr(), dy.ptr(), i64_of(y.len()), dx.ptr());
        }
    }

    fn add(&self, a: DeviceView<'_>, b: DeviceView<'_>, y: DeviceViewMut<'_>) {
        same_len(a.len(), y.len(), "add");
        same_len(b.len(), y.len(), "add");
        if !y.is_empty() {
            launch!(self, "add", elementwise(y.len()); a.ptr(), b.ptr(), i64_of(y.len()), y.ptr());
        }
    }

    fn mul(&self, n: usize, a: DeviceView<'_>, b: DeviceView<'_>, y: DeviceViewMut<'_>) {
        same_len(a.len(), n, "mul");
        same_len(b.len(), n, "mul");
        same_len(y.len(), n, "mul");
        if n > 0 {
            launch!(self, "mul", elementwise(n); a.ptr(), b.ptr(), i64_of(n), y.ptr());
        }
    }

    fn axpy(&self, alpha: f32, x: DeviceView<'_>, y: DeviceViewMut<'_>) {
        same_len(x.len(), y.len(), "axpy");
        if !y.is_empty() {
            launch!(self, "axpy", elementwise(y.len()); alpha, x.ptr(), i64_of(y.len()), y.ptr());
        }
    }

    fn add_bias(&self, rows: usize, d: usize, bias: DeviceView<'_>, y: DeviceViewMut<'_>) {
        assert_eq!(bias.len(), d, "add_bias: bias length");
        assert_eq!(y.len(), rows * d, "add_bias: y length");
        if rows * d > 0 {
            launch!(self, "add_bias", elementwise(rows * d);
                bias.ptr(), i64_of(rows), i32_of(d, "d"), y.ptr());
        }
    }

    fn bias_backward(&self, rows: usize, d: usize, dy: DeviceView<'_>, dbias: DeviceViewMut<'_>) {
        assert_eq!(dbias.len(), d, "bias_backward: dbias length");
        assert_eq!(dy.len(), rows * d, "bias_backward: dy length");
        self.column_sums_into(rows, d, dy.ptr(), dbias.ptr());
    }

    fn max_pool_forward(&self, s: &Pool2d, x: DeviceView<'_>, y: DeviceViewMut<'_>) {
        let (ho, wo) = check_pool(s, x.len(), y.len(), "max_forward");
        if ho * wo == 0 || y.is_empty() {
            return;
        }
        launch!(self, "max_pool_forward", elementwise(y.len());
            x.ptr(), i64_of(s.n * s.c), i32_of(s.h, "h"), i32_of(s.w, "w"), i32_of(s.k, "k"),
            i32_of(s.stride, "stride"), i32_of(s.pad, "pad"), i32_of(ho, "ho"),
            i32_of(wo, "wo"), y.ptr());
    }

    fn max_pool_backward(
        &self,
        s: &Pool2d,
        x: DeviceView<'_>,
        y: DeviceView<'_>,
        dy: DeviceView<'_>,
        dx: DeviceViewMut<'_>,
    ) {
        let (ho, wo) = check_pool(s, x.len(), y.len(), "max_backward");
        assert_eq!(dy.len(), y.len(), "max_backward: dy length");
        assert_eq!(dx.len(), x.len(), "max_backward: dx length");
        if dx.is_empty() {
            return;
        }
        if ho * wo == 0 {
            self.fill_raw(dx.ptr(), dx.len(), 0.0);
            return;
        }
        launch!(self, "max_pool_backward", elementwise(dx.len());
            x.ptr(), y.ptr(), dy.ptr(), i64_of(s.n * s.c), i32_of(s.h, "h"), i32_of(s.w, "w"),
            i32_of(s.k, "k"), i32_of(s.stride, "stride"), i32_of(s.pad, "pad"),
            i32_of(ho, "ho"), i32_of(wo, "wo"), dx.ptr());
    }

    fn avg_pool_forward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: DeviceView<'_>,
        y: DeviceViewMut<'_>,
    ) {
        assert_eq!(x.len(), n * c * hw, "avg_forward: x length");
        assert_eq!(y.len(), n * c, "avg_forward: y length");
        if hw == 0 || n * c == 0 {
            return;
        }
        launch!(self, "avg_pool_forward", per_block(n * c); x.ptr(), i64_of(hw), y.ptr());
    }

    fn avg_pool_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: DeviceView<'_>,
        dx: DeviceViewMut<'_>,
    ) {
        assert_eq!(dx.len(), n * c * hw, "avg_backward: dx length");
        assert_eq!(dy.len(), n * c, "avg_backward: dy length");
        if hw == 0 || n * c == 0 {
            return;
        }
        launch!(self, "avg_pool_backward", elementwise(dx.len());
            dy.ptr(), i64_of(n * c), i64_of(hw), dx.ptr());
    }

    fn attention_forward(
        &self,
        s: &Attention,
        q: DeviceView<'_>,
        k: DeviceView<'_>,
        v: DeviceView<'_>,
        probs: DeviceViewMut<'_>,
        out: DeviceViewMut<'_>,
    ) {
        check_attention(s, &[q.len(), k.len(), v.len(), out.len()], probs.len());
        if s.b * s.t * s.heads == 0 {
            return;
        }
        let at = |ptr: u64, len: usize, off: usize| (ptr + (off * 4) as u64, len - off);
        for h in 0..s.heads {
            let [sc, _] = plan::attention_forward_gemms(s, h);
            self.gemm_raw(
                &sc.g,
                at(q.ptr(), q.len(), sc.a_off),
                at(k.ptr(), k.len(), sc.b_off),
                at(probs.ptr(), probs.len(), sc.c_off),
            );
        }
        let rows = s.b * s.heads * s.t;
        launch!(self, "softmax_forward", per_warp(rows);
            probs.ptr(), i64_of(rows), i32_of(s.t, "t"));
        for h in 0..s.heads {
            let [_, o] = plan::attention_forward_gemms(s, h);
            self.gemm_raw(
                &o.g,
                at(probs.ptr(), probs.len(), o.a_off),
                at(v.ptr(), v.len(), o.b_off),
                at(out.ptr(), out.len(), o.c_off),
            );
        }
    }

    fn attention_backward(
        &self,
        s: &Attention,
        q: DeviceView<'_>,
        k: DeviceView<'_>,
        v: DeviceView<'_>,
        probs: DeviceView<'_>,
        dout: DeviceView<'_>,
        dq: DeviceViewMut<'_>,
        dk: DeviceViewMut<'_>,
        dv: DeviceViewMut<'_>,
    ) {
        let lens = [
            q.len(),
            k.len(),
            v.len(),
            dout.len(),
            dq.len(),
            dk.len(),
            dv.len(),
        ];
        check_attention(s, &lens, probs.len());
        if s.b * s.t * s.heads == 0 {
            return;
        }
        let plen = s.b * s.heads * s.t * s.t;
        let mut sc = self.scratch();
        let ds = scratch_slot(&self.stream, &mut sc.f32s, plen);
        let at = |ptr: u64, len: usize, off: usize| (ptr + (off * 4) as u64, len - off);
        for h in 0..s.heads {
            let [dp, ..] = plan::attention_backward_gemms(s, h);
            self.gemm_raw(
                &dp.g,
                at(dout.ptr(), dout.len(), dp.a_off),
                at(v.ptr(), v.len(), dp.b_off),
                at(ds, plen, dp.c_off),
            );
        }
        let rows = s.b * s.heads * s.t;
        launch!(self, "softmax_backward", per_warp(rows);
            probs.ptr(), ds, i64_of(rows), i32_of(s.t, "t"), s.scale);
        for h in 0..s.heads {
            let [_, gq, gk, gv] = plan::attention_backward_gemms(s, h);
            self.gemm_raw(
                &gq.g,
                at(ds, plen, gq.a_off),
                at(k.ptr(), k.len(), gq.b_off),
                at(dq.ptr(), dq.len(), gq.c_off),
            );
            self.gemm_raw(
                &gk.g,
                at(ds, plen, gk.a_off),
                at(q.ptr(), q.len(), gk.b_off),
                at(dk.ptr(), dk.len(), gk.c_off),
            );
            self.gemm_raw(
                &gv.g,
                at(probs.ptr(), probs.len(), gv.a_off),
                at(dout.ptr(), dout.len(), gv.b_off),
                at(dv.ptr(), dv.len(), gv.c_off),
            );
        }
    }

    fn embed_forward(
        &self,
        b: usize,
        t: usize,
        d: usize,
        scale: f32,
        x: DeviceView<'_>,
        pos: DeviceView<'_>,
        plane: DeviceView<'_>,
        mut y: DeviceViewMut<'_>,
    ) {
        let len = b * t * d;
        let (x, pos, plane) = (x.part(0..len), pos.part(0..t * d), plane.part(0..d));
        let y = y.part(0..len);
        if len > 0 {
            launch!(self, "embed_forward", elementwise(len);
                x.ptr(), pos.ptr(), plane.ptr(), i64_of(b), i32_of(t, "t"), i32_of(d, "d"),
                scale, y.ptr());
        }
    }

    fn embed_backward(
        &self,
        b: usize,
        t: usize,
        d: usize,
        scale: f32,
        dy: DeviceView<'_>,
        mut dx: DeviceViewMut<'_>,
        mut dplane: DeviceViewMut<'_>,
    ) {
        let len = b * t * d;
        let dy = dy.part(0..len);
        let dx = dx.part(0..len);
        let dplane = dplane.part(0..d);
        if len == 0 {
            return;
        }
        launch!(self, "scale_into", elementwise(len); dy.ptr(), i64_of(len), scale, dx.ptr());
        self.column_sums_into(b * t, d, dy.ptr(), dplane.ptr());
    }

    fn mask_scatter(&self, d: usize, rows: &[u32], token: DeviceView<'_>, x: DeviceViewMut<'_>) {
        plan::check_rows(rows, d, x.len(), "mask_scatter");
        let token = token.part(0..d);
        if rows.is_empty() || d == 0 {
            return;
        }
        let mut sc = self.scratch();
        let idx = self.upload_rows(&mut sc, rows);
        launch!(self, "mask_scatter", elementwise(rows.len() * d);
            token.ptr(), idx, i64_of(rows.len()), i32_of(d, "d"), x.ptr());
    }

    fn gather_rows(&self, d: usize, rows: &[u32], x: DeviceView<'_>, mut y: DeviceViewMut<'_>) {
        plan::check_rows(rows, d, x.len(), "gather_rows");
        let y = y.part(0..rows.len() * d);
        if rows.is_empty() || d == 0 {
            return;
        }
        let mut sc = self.scratch();
        let idx = self.upload_rows(&mut sc, rows);
        launch!(self, "gather_rows", elementwise(rows.len() * d);
            x.ptr(), idx, i64_of(rows.len()), i32_of(d, "d"), y.ptr());
    }

    fn scatter_add_rows(&self, d: usize, rows: &[u32], dy: DeviceView<'_>, dx: DeviceViewMut<'_>) {
        plan::check_rows(rows, d, dx.len(), "scatter_add_rows");
        let dy = dy.part(0..rows.len() * d);
        if rows.is_empty() || d == 0 {
            return;
        }
        let mut sc = self.scratch();
        let idx = self.upload_rows(&mut sc, rows);
        launch!(self, "scatter_add_rows", elementwise(rows.len() * d);
            dy.ptr(), idx, i64_of(rows.len()), i32_of(d, "d"), dx.ptr());
    }

    fn mse(
        &self,
        scale: f32,
        pred: DeviceView<'_>,
        target: DeviceView<'_>,
        mut loss: DeviceViewMut<'_>,
        dpred: DeviceViewMut<'_>,
    ) {
        let len = pred.len();
        assert!(
            target.len() == len && dpred.len() == len,
            "mse: lengths {len}, {}, {}",
            target.len(),
            dpred.len()
        );
        let loss = loss.part(0..1);
        if len == 0 {
            self.fill_raw(loss.ptr(), 1, 0.0);
            return;
        }
        // The CPU backend's gradient factor, rounded the same way.
        let g = scale * 2.0 / len as f32;
        let blocks = len.div_ceil(plan::REDUCE_CHUNK);
        let mut sc = self.scratch();
        let partials = scratch_slot(&self.stream, &mut sc.f64s, blocks);
        launch!(self, "mse_partials", per_block(blocks);
            pred.ptr(), target.ptr(), i64_of(len), g, i64_of(plan::REDUCE_CHUNK), dpred.ptr(),
            partials);
        self.finish_loss(partials, blocks, 1.0 / len as f64, loss.ptr());
    }

    fn triplet(
        &self,
        rows: usize,
        d: usize,
        margin: f32,
        scale: f32,
        a: DeviceView<'_>,
        p: DeviceView<'_>,
        n: DeviceView<'_>,
        mut loss: DeviceViewMut<'_>,
        da: DeviceViewMut<'_>,
        dp: DeviceViewMut<'_>,
        dn: DeviceViewMut<'_>,
    ) {
        let len = rows * d;
        for l in [a.len(), p.len(), n.len(), da.len(), dp.len(), dn.len()] {
            assert!(l >= len, "triplet: a buffer is shorter than {rows} x {d}");
        }
        let loss = loss.part(0..1);
        if rows == 0 {
            self.fill_raw(loss.ptr(), 1, 0.0);
            return;
        }
        let g = scale / rows as f32;
        let mut sc = self.scratch();
        let hinge = scratch_slot(&self.stream, &mut sc.f64s, rows);
        launch!(self, "triplet_rows", per_warp(rows);
            a.ptr(), p.ptr(), n.ptr(), i64_of(rows), i32_of(d, "d"), margin,
            crate::backend::cpu::loss::PAIRWISE_EPS, g, da.ptr(), dp.ptr(), dn.ptr(), hinge);
        self.finish_loss(hinge, rows, 1.0 / rows as f64, loss.ptr());
    }

    fn adam(
        &self,
        h: &Adam,
        params: DeviceViewMut<'_>,
        grads: DeviceView<'_>,
        m: DeviceViewMut<'_>,
        v: DeviceViewMut<'_>,
    ) {
        let len = params.len();
        assert!(
            grads.len() == len && m.len() == len && v.len() == len,
            "adam: params {len}, grads {}, m {}, v {}",
            grads.len(),
            m.len(),
            v.len()
        );
        assert!(h.step >= 1, "adam: step counts from 1");
        if len == 0 {
            return;
        }
        let c = AdamConstants::new(h);
        launch!(self, "adam", elementwise(len);
            params.ptr(), grads.ptr(), m.ptr(), v.ptr(), i64_of(len), c.b1, c.b2, c.c1, c.c2,
            c.eps, c.step_size, c.bc2_sqrt, c.decay, i32::from(c.use_decay));
    }

    fn sum_squares(&self, x: DeviceView<'_>) -> f64 {
        if x.is_empty() {
            return 0.0;
        }
        let blocks = x.len().div_ceil(plan::REDUCE_CHUNK);
        let mut sc = self.scratch();
        let partials = scratch_slot(&self.stream, &mut sc.f64s, blocks + 1);
        let out = partials + (blocks * std::mem::size_of::<f64>()) as u64;
        launch!(self, "sum_squares_partials", per_block(blocks);
            x.ptr(), i64_of(x.len()), i64_of(plan::REDUCE_CHUNK), partials);
        launch!(self, "sum_partials", cfg_1d(1, kernels::REDUCE_THREADS, 0);
            partials, i64_of(blocks), 1.0f64, out);
        let mut host = [0.0f64];
        self.bind();
        // SAFETY: `out` is one f64 inside the scratch; synchronised before reading.
        ok(
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut host, out, self.stream.cu_stream())
            },
            "downloading a sum",
        );
        self.synchronize();
        host[0]
    }

    fn scale(&self, alpha: f32, x: DeviceViewMut<'_>) {
        if !x.is_empty() {
            launch!(self, "scale_inplace", elementwise(x.len()); x.ptr(), i64_of(x.len()), alpha);
        }
    }

    fn device_address(&self, v: DeviceView<'_>) -> Option<u64> {
        Some(v.ptr())
    }
}

/// The constants of one Adam step, computed on the host exactly as the CPU backend does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConstants {
    pub b1: f32,
    pub b2: f32,
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub decay: f32,
    pub use_decay: bool,
}

impl AdamConstants {
    pub fn new(h: &Adam) -> Self {
        let t = h.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - f64::from(h.beta1).powi(t);
        let bc2 = 1.0 - f64::from(h.beta2).powi(t);
        AdamConstants {
            b1: h.beta1,
            b2: h.beta2,
            c1: 1.0 - h.beta1,
            c2: 1.0 - h.beta2,
            eps: h.eps,
            step_size: (f64::from(h.lr) / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay: 1.0 - h.lr * h.weight_decay,
            use_decay: h.weight_decay != 0.0,
        }
    }
}

/// The CPU backend's pooling shape checks; returns the output size.
fn check_pool(s: &Pool2d, x_len: usize, y_len: usize, what: &str) -> (usize, usize) {
    let (ho, wo) = s.out_hw();
    assert_eq!(x_len, s.n * s.c * s.h * s.w, "{what}: x length");
    assert_eq!(y_len, s.n * s.c * ho * wo, "{what}: y length");
    assert!(
        s.pad < s.k,
        "{what}: padding {} must be below the window {}",
        s.pad,
        s.k
    );
    (ho, wo)
}

fn check_attention(s: &Attention, lens: &[usize], probs: usize) {
    let len = s.b * s.t * s.heads * s.dh;
    assert!(
        lens.iter().all(|&l| l >= len) && probs >= s.b * s.heads * s.t * s.t,
        "attention: buffers too small for {s:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_constants_match_the_cpu_formula() {
        let h = Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 3,
        };
        let c = AdamConstants::new(&h);
        assert_eq!(
            c.step_size,
            (f64::from(1e-3f32) / (1.0 - f64::from(0.9f32).powi(3))) as f32
        );
        assert!((c.bc2_sqrt - (1.0 - 0.999f64.powi(3)).sqrt() as f32).abs() < 1e-6);
        assert_eq!(c.decay, 1.0 - 1e-3 * 0.01);
        assert!(c.use_decay);
        assert!(
            !AdamConstants::new(&Adam {
                weight_decay: 0.0,
                ..h
            })
            .use_decay
        );
    }

    /// One Adam step through AdamConstants with the kernel's arithmetic matches the CPU.
    #[test]
    fn adam_kernel_arithmetic_matches_the_cpu_step() {
        let h = Adam {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.05,
            step: 2,
        };
        let (mut p, g, mut m, mut v) = (
            vec![0.5f32, -1.0, 2.0],
            vec![0.1f32, -0.3, 0.0],
            vec![0.01f32, 0.0, -0.2],
            vec![0.001f32, 0.02, 0.0],
        );
        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
        crate::backend::cpu::optim::adam(&h, &mut p, &g, &mut m, &mut v);
        let c = AdamConstants::new(&h);
        for i in 0..3 {
            if c.use_decay {
                p2[i] *= c.decay;
            }
            m2[i] = c.b1 * m2[i] + c.c1 * g[i];
            v2[i] = c.b2 * v2[i] + c.c2 * g[i] * g[i];
            let denom = v2[i].sqrt() / c.bc2_sqrt + c.eps;
            p2[i] -= c.step_size * (m2[i] / denom);
        }
        assert_eq!((p, m, v), (p2, m2, v2));
    }

    /// On a machine without a driver (this build machine), opening the backend is an error
    /// that says so, not a panic inside cudarc.
    #[test]
    fn without_a_driver_new_is_a_clear_error() {
        // SAFETY: only tries to open the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        let e = Cuda::new(0, CudaOptions::default())
            .err()
            .expect("no driver, no backend");
        assert!(e.to_string().contains("no CUDA driver (libcuda.so)"), "{e}");
    }

    #[test]
    fn pool_checks_are_the_cpu_checks() {
        let s = Pool2d {
            n: 1,
            c: 2,
            h: 5,
            w: 5,
            k: 3,
            stride: 2,
            pad: 1,
        };
        assert_eq!(check_pool(&s, 50, 18, "t"), (3, 3));
        assert!(
            std::panic::catch_unwind(|| check_pool(&Pool2d { pad: 3, ..s }, 50, 2 * 5 * 5, "t"))
                .is_err()
        );
    }
}
