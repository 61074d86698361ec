//! Writing NIfTI-1 images (.nii.gz) with a chosen data type and affine. (being written)
