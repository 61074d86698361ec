//! The Medical Transformer. Its static description: presets and their shapes (`config`), the
//! one table of parameter names, shapes and offsets in the flat buffer (`layout`), the
//! deterministic initial values and the fixed position code (`init`). Its computation, written
//! once against the backend trait: the slice encoder, the transformer, the two pretraining
//! objectives, and the planes of a volume as slice batches.
pub mod augment;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod init;
pub mod layout;
pub mod linear;
pub mod objective;
pub mod params;
pub mod planes;
pub mod task;
pub mod transformer;

pub use config::{ModelConfig, PlaneShape, Preset};
pub use layout::{Entry, Head, Kind, Layout, Part};
pub use planes::Plane;
