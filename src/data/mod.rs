//! The data path: NIfTI files in, preprocessing onto the model's grid, the HDF5 corpus out,
//! and the reader side that training uses (open, validate, read a subject, shard by rank).
pub mod corpus;
pub mod geometry;
pub mod inspect;
pub mod manifest;
pub mod montage;
pub mod nifti;
pub mod pack;
pub mod preprocess;
pub mod shard;
pub mod synth;
pub mod writeback;
