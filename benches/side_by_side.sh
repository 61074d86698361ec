#!/usr/bin/env bash
# One optimizer step of each pretraining stage, mtx-hpc next to our PyTorch reference
# (benches/reference/bench_step.py) on the same work: paper preset, batch 4, 1 and 2 threads,
# run back to back, for the side-by-side table in docs/PERFORMANCE.md. PyTorch runs with
# glibc's mmap and trim thresholds raised (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ at
# 1 GiB), its best setting on this CPU, as mtx-hpc sets them itself (src/main.rs).
#
#   bash benches/side_by_side.sh [PYTHON_WITH_TORCH] > side-by-side.md
#
# Needs a release build (cargo build --release) and a Python with torch (never installed by
# the project's scripts: `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install
# torch numpy`). Run it on an idle machine: timings of a loaded one are not worth recording.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-/tmp/torchvenv/bin/python}
BIN=target/release/mtx-hpc
STEPS=${MTX_SBS_STEPS:-3}
[ -x "$BIN" ] || { echo "side_by_side.sh: build first: cargo build --release" >&2; exit 2; }
"$PY" -c 'import torch' 2>/dev/null || { echo "side_by_side.sh: $PY has no torch" >&2; exit 2; }
echo "| stage | threads | mtx-hpc step | mtx-hpc peak | PyTorch step | PyTorch peak |"
echo "|---|---|---|---|---|---|"
for stage in ${MTX_SBS_STAGES:-mevp mevp-trainable triplet}; do
    for threads in 1 2; do
        ours=$("$BIN" bench step --preset paper --batch 4 --stage "$stage" --threads "$threads" \
            --steps "$STEPS" --device cpu | tail -1)
        theirs=$(cd benches/reference && MALLOC_MMAP_THRESHOLD_=1073741824 \
            MALLOC_TRIM_THRESHOLD_=1073741824 "$PY" bench_step.py --stage "$stage" --batch 4 \
            --threads "$threads" --steps "$STEPS" | tail -1)
        # "median step 1.234 s | ... | peak memory 589 MiB"
        o_step=$(sed -E 's/^median step ([0-9.]+) s.*/\1/' <<<"$ours")
        o_peak=$(sed -E 's/.*peak memory ([0-9?]+ MiB).*/\1/' <<<"$ours")
        t_step=$(sed -E 's/.*median step ([0-9.]+) s.*/\1/' <<<"$theirs")
        t_peak=$(sed -E 's/.*peak memory ([0-9]+ MiB).*/\1/' <<<"$theirs")
        echo "| $stage | $threads | $o_step s | $o_peak | $t_step s | $t_peak |"
    done
done
echo
echo "$(date -u +%F), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;" \
    "$("$PY" -c 'import torch; print("torch", torch.__version__)')"
