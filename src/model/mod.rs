//! The Medical Transformer, written once against the backend trait.
pub mod encoder;
pub mod linear;
pub mod params;
pub mod planes;
pub mod transformer;
