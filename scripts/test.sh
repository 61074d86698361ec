#!/usr/bin/env bash
# README command 2: installs everything (scripts/setup.sh), then runs the formatting and lint
# gates and the whole test suite (unit, integration, CLI, interop with nibabel/h5py).
set -euo pipefail
cd "$(dirname "$0")/.."
MTX_SKIP_BUILD=1 bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets"
cargo clippy --all-targets --quiet -- -D warnings
# Benchmarks are compiled by clippy above but not run here: timings are not tests.
echo "== cargo test"
cargo test --no-fail-fast
