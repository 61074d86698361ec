//! NIfTI-1 files: reading with validation (`read`), writing (`write`).
pub mod read;
pub mod write;
