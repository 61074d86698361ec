//! Pretraining: the run configuration (TOML with defaults from PAPER.md) and the HDF5
//! checkpoint format with its run-folder policy (last K, best, final).
pub mod checkpoint;
pub mod config;

pub use checkpoint::{Checkpoint, CheckpointMeta};
pub use config::{RunConfig, Stage, Stages};
