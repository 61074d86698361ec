//! mtx-hpc: pretraining the Medical Transformer on brain MRI, on clusters.
//!
//! The library does all the work; `main.rs` only calls [`cli::main`]. Rooms, one per concern:
//! `data` (NIfTI, preprocessing, the cohort generator, the HDF5 corpus, sharding), `io`
//! (atomic files, checksums), `progress` (what rank 0 shows on a terminal), `model` (presets,
//! the parameter layout, initialisation), `train` (run configuration, checkpoints).
pub mod backend;
pub mod cli;
pub mod data;
pub mod dist;
pub mod downstream;
pub mod io;
pub mod model;
pub mod progress;
pub mod rng;
pub mod train;

/// The tool's version, written into every file we produce.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
