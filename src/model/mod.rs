//! The model's static description: presets and their shapes (`config`), the one table of
//! parameter names, shapes and offsets in the flat buffer (`layout`), and the deterministic
//! initial values of that buffer plus the fixed position code (`init`).
pub mod config;
pub mod init;
pub mod layout;

pub use config::{ModelConfig, Plane, PlaneShape, Preset};
pub use layout::{Entry, Kind, Layout, Part};
