#!/usr/bin/env bash
# Every GPU check in one call on the GPU machine (docs/CUDA.md). That machine has no Rust
# toolchain, no Debian MPI/HDF5 libraries and no network, so:
#
#   scripts/gpu-check.sh build   # here: self-contained GPU test binary + mtx-hpc (MPI off,
#                                # HDF5 static) into target/gpu-bundle/, then prints the
#                                # device-tool call that carries them
#   scripts/gpu-check.sh run     # there: probe driver/glibc/libraries, GPU tests in f32 and
#                                # TF32, the GEMM peak, `mtx-hpc bench step` next to PyTorch
#                                # (benches/reference/bench_step.py --device cuda) at batch 4
#                                # and MTX_GPU_FILL_BATCH (32), a short table; logs into $OUT
#   scripts/gpu-check.sh run tests  # there: the probe and the tests only, no benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${MTX_GPU_BUNDLE:-target/gpu-bundle}
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
    # With MPI too (libmpi linked dynamically: the GPU machine's OpenMPI 4.1 has the same
    # libmpi.so.40), for the check that two ranks sharing the GPU equal one.
    if cargo build --release --no-default-features --features mpi,cuda,hdf5-static --bin mtx-hpc; then
        cp target/release/mtx-hpc "$BUNDLE/mtx-hpc-mpi"
    else
        echo "gpu-check: no MPI build (no MPI library here?): the two-rank check will be skipped" >&2
    fi
    # Debug info would take the bundle past what the device tool carries (64 MiB).
    strip "$BUNDLE"/*
    echo "gpu-check: bundle in $BUNDLE:"
    ls -l "$BUNDLE"
    echo "gpu-check: not linked statically (must exist on the GPU machine):"
    # The driver's libcuda: from the loader's cache, else from the driver's own folder.
    if ! ldconfig -p | grep -q 'libcuda\.so'; then
        local d
        for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib64 /usr/local/cuda/compat; do
            if [ -e "$d/libcuda.so.1" ] || [ -e "$d/libcuda.so" ]; then
                export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
                echo "libcuda not in the loader cache: using $d" | tee -a "$out/probe.txt"
                break
            fi
        done
    fi
    ldconfig -p | grep -E 'libcuda\.so|libnccl' | tee -a "$out/probe.txt" || true
    for b in "$BUNDLE"/*; do ldd "$b" | awk '{print "  " $1}'; done | sort -u
    cat <<MSG

Run on the GPU machine with the device tool:
  run(command="bash scripts/gpu-check.sh run", carry=["$BUNDLE"], timeout_s=600)
MSG
}

run() {
    # A check that fails is recorded in the summary; the rest still run.
    set +e +o pipefail
    # The device tool brings back at most 8 files from $OUT: every log goes into one folder,
    # packed into $OUT/logs.tgz at the end, with the short ones beside it.
    local dest="${OUT:-$PWD/gpu-check-out}" out=/tmp/gpu-check-logs
    rm -rf "$out" && mkdir -p "$out" "$dest"
    echo "== probe" | tee "$out/probe.txt"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
        ldd --version | head -1
        uname -a
        command -v mpirun mpiexec || echo "no mpirun/mpiexec on PATH"
        python3 -c "import torch; print(\"torch\", torch.__version__, \"cudnn\", torch.backends.cudnn.version())" || true
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
    if timeout 150 "$BUNDLE/gpu-tests" --test-threads=1 --nocapture >"$out/gpu-tests-f32.txt" 2>&1; then
        status+=("gpu tests f32: PASS")
    else
        status+=("gpu tests f32: FAIL")
    fi
    tail -5 "$out/gpu-tests-f32.txt"
    echo "== GPU tests (TF32)"
    if MTX_GPU_TF32=1 timeout 100 "$BUNDLE/gpu-tests" --test-threads=1 --nocapture >"$out/gpu-tests-tf32.txt" 2>&1; then
        status+=("gpu tests tf32: PASS")
    else
        status+=("gpu tests tf32: FAIL")
    fi
    tail -5 "$out/gpu-tests-tf32.txt"

    echo "== two ranks sharing the GPU (host-staged MPI) against one rank: 10 MEVP steps, tiny preset"
    local mpi_bin="$BUNDLE/mtx-hpc-mpi" g=/tmp/gpu-check-mpi
    if [ -x "$mpi_bin" ] && command -v mpirun >/dev/null && ! ldd "$mpi_bin" | grep -q 'not found'; then
        rm -rf "$g" && mkdir -p "$g"
        {
            mpirun --version | head -1
            "$mpi_bin" synth --cohort healthy --subjects 12 --seed 1 --out "$g/h" >/dev/null &&
                "$mpi_bin" pack --manifest "$g/h/manifest.csv" --out "$g/c.h5" --grid 32,38,32 \
                    --spacing 6 --val-fraction 0.2 >/dev/null &&
                for n in 1 2; do
                    timeout 120 mpirun --allow-run-as-root --oversubscribe -n "$n" "$mpi_bin" pretrain \
                        --corpus "$g/c.h5" --out "$g/run$n" --preset tiny --stage mevp --steps 10 \
                        --batch 4 --device cuda | grep -E 'gradients:|GPU|error' | head -4
                done &&
                python3 - "$g/run1" "$g/run2" <<'PY'
import json, sys, h5py, numpy as np
one, two = sys.argv[1:]
loss = lambda d: [json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl")]
l1, l2 = loss(one), loss(two)
dl = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
worst, name = 0.0, ""
with h5py.File(f"{one}/final.h5", "r", locking=False) as a, h5py.File(f"{two}/final.h5", "r", locking=False) as b:
    for k in a["params"]:
        if k.endswith("attn.k.bias") or k == "encoder.fc.bias":
            continue  # exactly zero true gradient: Adam-scaled rounding noise (tests/mpi.rs)
        x, y = a["params"][k][()], b["params"][k][()]
        r = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)
        if r > worst: worst, name = r, k
ok = len(l1) == len(l2) == 10 and dl <= 1e-5 and worst < 1e-5
print(f"{'PASS' if ok else 'FAIL'}: loss curves within {dl:.1e}, largest parameter difference {worst:.1e} ({name})")
PY
        } >"$out/mpi-two-ranks.txt" 2>&1
        cat "$out/mpi-two-ranks.txt"
        status+=("two ranks on one GPU vs one: $(tail -1 "$out/mpi-two-ranks.txt")")
    else
        status+=("two ranks on one GPU vs one: not run (no mtx-hpc-mpi, no mpirun or a library missing)")
    fi

    if [ "${1:-all}" = tests ]; then
        summarise "$out" "$dest" "${status[@]}"
        return
    fi

    echo "== GEMM peak (PyTorch, 8192^3, f32 and TF32)"
    local peaks
    peaks=$(timeout 120 python3 - <<'PY' 2>&1 | tee "$out/gemm-peak.txt" | tail -1
import time, torch
a = torch.randn(8192, 8192, device="cuda"); b = torch.randn(8192, 8192, device="cuda")
out = []
for tf32 in (False, True):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): a @ b
    torch.cuda.synchronize(); s = (time.perf_counter() - t) / 10
    out.append(2 * 8192**3 / s / 1e12)
print(f"f32 {out[0]:.1f} tf32 {out[1]:.1f}")
PY
    ) || true
    echo "$peaks"
    local peak_f32 peak_tf32
    peak_f32=$(sed -nE 's/^f32 ([0-9.]+) tf32 .*/\1/p' <<<"$peaks")
    peak_tf32=$(sed -nE 's/.* tf32 ([0-9.]+)$/\1/p' <<<"$peaks")

    echo "== bench step (paper preset, ours next to PyTorch on this GPU)"
    local table=("| stage | batch | math | ours step | subjects/s | slices/s | TFLOP/s | of GEMM peak | PyTorch step | PyTorch/ours step |"
        "|---|---|---|---|---|---|---|---|---|---|")
    local stage batch math
    for stage in triplet mevp mevp-trainable; do
        for batch in 4 ${MTX_GPU_FILL_BATCH:-32}; do
            for math in f32 tf32; do
                local flag=() tag="$stage-b$batch-$math"
                [ "$math" = tf32 ] && flag=(--tf32)
                timeout 60 "$BUNDLE/mtx-hpc" bench step --preset paper --batch "$batch" --stage "$stage" \
                    --steps 5 --device cuda "${flag[@]}" >"$out/bench-$tag.txt" 2>&1 || true
                (cd benches/reference && timeout 60 python3 bench_step.py --preset paper --stage "$stage" \
                    --batch "$batch" --steps 5 --device cuda "${flag[@]}") >"$out/torch-$tag.txt" 2>&1 || true
                local ours theirs o_step t_step subj slc gflops peak share ratio
                ours=$(grep '^median step' "$out/bench-$tag.txt" | tail -1)
                theirs=$(grep 'median step' "$out/torch-$tag.txt" | tail -1)
                o_step=$(sed -nE 's/^median step ([0-9.]+) s.*/\1/p' <<<"$ours")
                t_step=$(sed -nE 's/.*median step ([0-9.]+) s.*/\1/p' <<<"$theirs")
                subj=$(sed -nE 's/.*\| ([0-9.]+) subjects\/s.*/\1/p' <<<"$ours")
                slc=$(sed -nE 's/.*\| ([0-9.]+) slices\/s.*/\1/p' <<<"$ours")
                gflops=$(sed -nE 's/.*\| ([0-9.]+) GFLOP\/s.*/\1/p' <<<"$ours")
                peak=$peak_f32 && [ "$math" = tf32 ] && peak=$peak_tf32
                share=$(awk -v g="$gflops" -v p="$peak" 'BEGIN{if(g!=""&&p>0) printf "%.1f %%", g/10/p; else print "?"}')
                ratio=$(awk -v o="$o_step" -v t="$t_step" 'BEGIN{if(o>0&&t>0) printf "%.2f", t/o; else print "?"}')
                table+=("| $stage | $batch | $math | ${o_step:-FAIL} s | ${subj:-?} | ${slc:-?} | $(awk -v g="$gflops" 'BEGIN{if(g!="") printf "%.2f", g/1000; else print "?"}') | $share | ${t_step:-FAIL} s | $ratio |")
                [ -n "$o_step" ] || status+=("bench step $tag: FAIL ($(tail -1 "$out/bench-$tag.txt"))")
                [ -n "$t_step" ] || status+=("PyTorch $tag: FAIL ($(tail -1 "$out/torch-$tag.txt"))")
            done
        done
    done
    for stage in diagnosis age segmentation; do
        local log="$out/bench-$stage-b4-f32.txt"
        if timeout 60 "$BUNDLE/mtx-hpc" bench step --preset paper --batch 4 --stage "$stage" --steps 5 \
            --device cuda >"$log" 2>&1; then
            status+=("bench step $stage b4 f32: $(tail -1 "$log")")
        else
            status+=("bench step $stage b4 f32: FAIL ($(tail -1 "$log"))")
        fi
    done
    printf '%s\n' "${table[@]}" | tee "$out/table.md"
    echo "GEMM peak measured (PyTorch 8192^3): f32 ${peak_f32:-?} TFLOP/s, TF32 ${peak_tf32:-?} TFLOP/s;" \
        "TFLOP/s counts the encoder's convolutions (mtx-hpc's count, the same work for both)" | tee -a "$out/table.md"

    summarise "$out" "$dest" "${status[@]}"
}

# The summary lines, the worst errors of the GPU tests, and the logs packed into $dest.
summarise() {
    local out=$1 dest=$2
    shift 2
    echo
    echo "== summary ($(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    printf '%s\n' "$@" | tee "$out/summary.txt"
    # Worst relative error per test, from the per-tensor lines the tests print.
    for f in "$out"/gpu-tests-*.txt; do
        echo "largest errors in $(basename "$f"):"
        grep -E '^ *[0-9.e+-]+ \(tol' "$f" | sort -g -r | head -3 || true
    done | tee -a "$out/summary.txt"
    tar czf "$dest/logs.tgz" -C "$out" .
    cp "$out"/{probe.txt,summary.txt,table.md,gpu-tests-f32.txt,gpu-tests-tf32.txt,mpi-two-ranks.txt} "$dest"/ 2>/dev/null || true
}

case "${1:-}" in
    build) build ;;
    run) run "${2:-all}" ;;
    *) echo "usage: $0 build | run [all|tests]" >&2; exit 2 ;;
esac
