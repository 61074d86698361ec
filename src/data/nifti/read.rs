//! Reading NIfTI-1 images: validation, orientation, scaling. (being written)
