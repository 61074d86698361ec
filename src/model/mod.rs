//! The Medical Transformer, written once against the backend trait.
pub mod augment;
pub mod encoder;
pub mod linear;
pub mod objective;
pub mod params;
pub mod planes;
pub mod transformer;
