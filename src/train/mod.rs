//! Pretraining: the run configuration (TOML with defaults from PAPER.md), the HDF5
//! checkpoint format with its run-folder policy (last K, best, final), and the loop.
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod grad_comm;
pub mod overlap;
pub mod prefetch;
pub mod pretrain;
pub mod scaling;
pub mod target_cache;

pub use checkpoint::{Checkpoint, CheckpointMeta};
pub use config::{RunConfig, Stage, Stages};
