#!/usr/bin/env bash
# Every GPU check in one call on the GPU machine (docs/CUDA.md). That machine has no Rust
# toolchain, no Debian MPI/HDF5 libraries and no network, so:
#
#   scripts/gpu-check.sh build   # here: self-contained GPU test binary + mtx-hpc (MPI off,
#                                # HDF5 static) into target/gpu-bundle/, then prints the
#                                # device-tool call that carries them
#   scripts/gpu-check.sh run     # there: probe driver/glibc/libraries, GPU tests in f32 and
#                                # TF32, `mtx-hpc bench step`, a short table; logs into $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=target/gpu-bundle
FEATURES=gpu-tests,hdf5-static

build() {
    # hdf5-static builds HDF5 from source and needs cmake >= 3.26 (Debian 12 has 3.25).
    if ! cmake --version 2>/dev/null | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=26))}'; then
        [ -x .venv/bin/cmake ] || .venv/bin/pip install -q --disable-pip-version-check "cmake>=3.26,<4"
        export PATH="$PWD/.venv/bin:$PATH"
    fi
    local args=(--release --no-default-features --features "$FEATURES")
    cargo build "${args[@]}" --bin mtx-hpc
    local test_bin
    test_bin=$(cargo test "${args[@]}" --test gpu --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    [ -n "$test_bin" ] || { echo "gpu-check: could not find the gpu test binary" >&2; exit 1; }
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    cp "$test_bin" "$BUNDLE/gpu-tests"
    cp target/release/mtx-hpc "$BUNDLE/mtx-hpc"
    echo "gpu-check: bundle in $BUNDLE:"
    ls -l "$BUNDLE"
    echo "gpu-check: not linked statically (must exist on the GPU machine):"
    for b in "$BUNDLE"/*; do ldd "$b" | awk '{print "  " $1}'; done | sort -u
    cat <<MSG

Run on the GPU machine with the device tool:
  run(command="bash scripts/gpu-check.sh run", carry=["$BUNDLE"], timeout_s=600)
MSG
}

run() {
    local out="${OUT:-$PWD/gpu-check-out}"
    mkdir -p "$out"
    echo "== probe" | tee "$out/probe.txt"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
        ldd --version | head -1
        uname -a
    } 2>&1 | tee -a "$out/probe.txt"
    # The CUDA 13 libraries (cuBLAS, NVRTC) live in Python's site-packages there.
    local libdir
    libdir=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
    if [ -n "$libdir" ] && [ -d "$libdir" ]; then
        export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "CUDA libraries: $libdir" | tee -a "$out/probe.txt"
        ls "$libdir" | grep -E 'cublas|nvrtc' | tee -a "$out/probe.txt"
    else
        echo "no nvidia/cu13/lib in site-packages: relying on the system library path" | tee -a "$out/probe.txt"
    fi
    for b in "$BUNDLE"/*; do
        echo "ldd $b:" && ldd "$b" | grep -E 'not found' || echo "  all found"
    done 2>&1 | tee -a "$out/probe.txt"

    local status=()
    echo "== GPU tests (f32)"
    if "$BUNDLE/gpu-tests" --test-threads=1 --nocapture >"$out/gpu-tests-f32.txt" 2>&1; then
        status+=("gpu tests f32: PASS")
    else
        status+=("gpu tests f32: FAIL")
    fi
    tail -5 "$out/gpu-tests-f32.txt"
    echo "== GPU tests (TF32)"
    if MTX_GPU_TF32=1 "$BUNDLE/gpu-tests" --test-threads=1 --nocapture >"$out/gpu-tests-tf32.txt" 2>&1; then
        status+=("gpu tests tf32: PASS")
    else
        status+=("gpu tests tf32: FAIL")
    fi
    tail -5 "$out/gpu-tests-tf32.txt"

    echo "== bench step"
    local device=()
    if "$BUNDLE/mtx-hpc" bench step --help 2>/dev/null | grep -q -- '--device'; then
        device=(--device cuda)
    else
        status+=("bench step: this mtx-hpc has no --device yet: timings below are the CPU's")
    fi
    for stage in triplet mevp mevp-trainable diagnosis age segmentation; do
        local log="$out/bench-$stage-b4.txt"
        if "$BUNDLE/mtx-hpc" bench step --preset paper --batch 4 --stage "$stage" "${device[@]}" >"$log" 2>&1; then
            status+=("bench step $stage b4: $(tail -1 "$log")")
        else
            status+=("bench step $stage b4: FAIL ($(tail -1 "$log"))")
        fi
    done

    echo
    echo "== summary ($(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
    # Worst relative error per test, from the per-tensor lines the tests print.
    for f in "$out"/gpu-tests-*.txt; do
        echo "largest errors in $(basename "$f"):"
        grep -E '^ *[0-9.e+-]+ \(tol' "$f" | sort -g -r | head -3
    done | tee -a "$out/summary.txt"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
