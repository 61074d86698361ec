#!/usr/bin/env bash
# Installs everything mtx-hpc needs on Debian 12 (as root), idempotently:
#   - Debian packages: OpenMPI, HDF5, libclang (rsmpi's bindgen), pkg-config, the Colin27
#     template (mricron-data), h5dump, and Slurm + munge for tests/slurm.rs (installed only,
#     not started: scripts/slurm.sh starts a private instance);
#   - a Python virtual environment in .venv with what the tests and benchmarks use
#     (numpy, scipy, nibabel, h5py, the MNI152 template from the nilearn wheel) and the
#     CUDA 13.0 compilers for the kernel check (NVRTC and ptxas wheels; no GPU needed);
#   - the release binary, target/release/mtx-hpc.
# Set MTX_SKIP_BUILD=1 to skip the cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libclang-dev pkg-config
    mricron-data python3-venv ca-certificates slurmctld slurmd slurm-client munge)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust >= 1.85 (rustup) and run again." >&2
    exit 1
fi

# Python for tests and benchmarks: a venv, because Debian's python refuses pip (PEP 668).
PY_STAMP=.venv/.mtx-setup-v1
if [ ! -f "$PY_STAMP" ]; then
    echo "setup: creating the Python environment in .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check \
        "numpy<3" "scipy<2" "nibabel>=5,<6" "h5py>=3.9,<4"
    # Only the MNI152 2009a template is needed from nilearn: no dependencies.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "nilearn==0.14.*"
    touch "$PY_STAMP"
fi

# NVRTC and ptxas for tests/kernels_compile.rs, pinned to the GPU machine's CUDA 13.0
# (docs/CUDA.md). nvidia-cuda-nvcc pulls its dependencies (runtime, crt, nvvm) unpinned at the
# newest release: pin them to 13.0 too, or ptxas and NVRTC come from different releases.
CUDA_STAMP=.venv/.mtx-cuda-13.0-v1
if [ ! -f "$CUDA_STAMP" ]; then
    echo "setup: installing the CUDA 13.0 NVRTC and ptxas wheels into .venv"
    .venv/bin/pip install -q --disable-pip-version-check \
        "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-nvcc==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
    touch "$CUDA_STAMP"
fi

if [ "${MTX_SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --quiet
fi
