//! The CUDA C sources of `kernels/`, embedded in the binary, and their compilation by NVRTC.
//! Every file is compiled after the shared prelude `kernels/common.cuh` with a `#line`
//! directive in between, so NVRTC's log names the file and line a reader opens. The same
//! function serves the backend at start-up (for the device's own compute capability) and the
//! CI check that compiles every file for sm_90 (tests/kernels_compile.rs).
use std::fmt;

/// Threads per block of every kernel that calls the prelude's `block_sum`; handed to NVRTC
/// as `-DMTX_REDUCE_THREADS`, so the launch code and the kernels share one definition.
pub const REDUCE_THREADS: u32 = 256;
// block_sum sums whole warps, then the warp sums in one warp.
const _: () = assert!(REDUCE_THREADS % 32 == 0 && REDUCE_THREADS / 32 <= 32);

/// The prelude compiled in front of every kernel file.
pub const PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// One kernel source file and the entry points the backend loads from it.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    pub file: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

macro_rules! kernel_file {
    ($file:literal, [$($k:literal),* $(,)?]) => {
        KernelFile {
            file: $file,
            source: include_str!(concat!("../../../kernels/", $file)),
            kernels: &[$($k),*],
        }
    };
}

/// Every file in `kernels/` (the CI test checks that none is missing from this table and
/// that each listed entry point exists in the compiled PTX).
pub const FILES: &[KernelFile] = &[
    kernel_file!("attention.cu", ["softmax_forward", "softmax_backward"]),
    kernel_file!("conv.cu", ["im2col", "col2im", "permute_nc"]),
    kernel_file!(
        "elementwise.cu",
        [
            "fill",
            "scale_inplace",
            "scale_into",
            "relu_forward",
            "relu_backward",
            "add",
            "mul",
            "axpy",
            "add_bias"
        ]
    ),
    kernel_file!("loss.cu", ["mse_partials", "triplet_rows"]),
    kernel_file!(
        "norm.cu",
        [
            "instance_norm_forward",
            "instance_norm_backward",
            "instance_norm_param_grads",
            "layer_norm_forward",
            "layer_norm_backward"
        ]
    ),
    kernel_file!("optim.cu", ["adam"]),
    kernel_file!(
        "pool.cu",
        [
            "max_pool_forward",
            "max_pool_backward",
            "avg_pool_forward",
            "avg_pool_backward"
        ]
    ),
    kernel_file!(
        "reduce.cu",
        [
            "col_partials",
            "col_finish",
            "sum_squares_partials",
            "sum_partials",
            "finish_loss"
        ]
    ),
    kernel_file!(
        "sequence.cu",
        [
            "embed_forward",
            "mask_scatter",
            "gather_rows",
            "scatter_add_rows"
        ]
    ),
];

/// The text NVRTC compiles for `file`: the prelude, then the file from its line 1.
pub fn full_source(file: &str, source: &str) -> String {
    format!("{PRELUDE}\n#line 1 \"{file}\"\n{source}")
}

/// NVRTC options for a GPU of compute capability `major.minor` (e.g. `(9, 0)` for sm_90).
/// Default IEEE float behaviour (no fast math, no flush to zero): the kernels are checked
/// against the CPU backend to a few ulps.
pub fn options(major: u32, minor: u32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{major}{minor}"),
        format!("-DMTX_REDUCE_THREADS={REDUCE_THREADS}"),
    ]
}

/// A kernel file that did not compile (or NVRTC that could not run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// libnvrtc could not be loaded: no compile was attempted.
    NoNvrtc,
    /// NVRTC rejected the file; `log` is NVRTC's program log.
    Compile {
        file: String,
        status: String,
        options: Vec<String>,
        log: String,
    },
    /// NVRTC failed outside the compile proper (creating the program, reading the PTX).
    Nvrtc { file: String, what: String },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::NoNvrtc => write!(
                f,
                "NVRTC (libnvrtc.so.13) was not found: the CUDA kernels cannot be compiled. \
                 HINT: install the nvidia-cuda-nvrtc 13.0 wheel (scripts/setup.sh does) and put \
                 its nvidia/cu13/lib folder on LD_LIBRARY_PATH"
            ),
            KernelError::Compile {
                file,
                status,
                options,
                log,
            } => write!(
                f,
                "kernel file kernels/{file} does not compile ({status}; options {}):\n{}",
                options.join(" "),
                log.trim_end()
            ),
            KernelError::Nvrtc { file, what } => write!(f, "kernel file kernels/{file}: {what}"),
        }
    }
}

impl std::error::Error for KernelError {}

/// Whether libnvrtc can be loaded. cudarc panics on the first NVRTC call when it cannot, so
/// this is asked first.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library; no NVRTC function is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one kernel file (prelude included) to PTX text for compute capability
/// `major.minor`.
pub fn compile(file: &str, source: &str, major: u32, minor: u32) -> Result<String, KernelError> {
    use cudarc::nvrtc::{CompileError, CompileOptions, compile_ptx_with_opts};
    if !nvrtc_present() {
        return Err(KernelError::NoNvrtc);
    }
    let opts = CompileOptions {
        options: options(major, minor),
        name: Some(file.to_string()),
        ..Default::default()
    };
    match compile_ptx_with_opts(full_source(file, source), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError {
            nvrtc,
            options,
            log,
        }) => Err(KernelError::Compile {
            file: file.to_string(),
            status: format!("{nvrtc:?}"),
            options,
            log: log.to_string_lossy().into_owned(),
        }),
        Err(other) => Err(KernelError::Nvrtc {
            file: file.to_string(),
            what: format!("{other:?}"),
        }),
    }
}

/// The entry points (`.entry NAME(`) a PTX text defines.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(".visible .entry ")?;
            let name = rest.split('(').next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_source_restarts_line_numbers_at_the_file() {
        let src = full_source("x.cu", "line one\nline two");
        let after = src.split("#line 1 \"x.cu\"\n").nth(1).unwrap();
        assert_eq!(after, "line one\nline two");
        assert!(src.starts_with(PRELUDE));
    }

    #[test]
    fn options_name_the_architecture_and_the_reduction_block() {
        let o = options(9, 0);
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(o.contains(&format!("-DMTX_REDUCE_THREADS={REDUCE_THREADS}")));
    }

    #[test]
    fn ptx_entries_reads_visible_entries() {
        let ptx = ".version 9.0\n.visible .entry fill(\n\t.param .u64 a\n)\n\
                   .func helper(\n.visible .entry add(\n";
        assert_eq!(ptx_entries(ptx), vec!["fill", "add"]);
    }

    #[test]
    fn compile_error_message_names_the_file_and_keeps_the_log() {
        let e = KernelError::Compile {
            file: "norm.cu".into(),
            status: "NVRTC_ERROR_COMPILATION".into(),
            options: vec!["--gpu-architecture=sm_90".into()],
            log: "norm.cu(3): error: identifier \"foo\" is undefined\n".into(),
        };
        let msg = e.to_string();
        assert!(msg.contains("kernels/norm.cu"), "{msg}");
        assert!(msg.contains("identifier \"foo\" is undefined"), "{msg}");
        assert!(msg.contains("sm_90"), "{msg}");
    }

    #[test]
    fn every_listed_entry_point_is_declared_in_its_source() {
        for f in FILES {
            for k in f.kernels {
                let decl = format!("__global__ void {k}(");
                assert!(f.source.contains(&decl), "{} does not declare {k}", f.file);
            }
        }
    }
}
