//! The CUDA backend (in progress): for now the kernel sources and their NVRTC compilation.
pub mod kernels;
