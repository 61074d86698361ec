#!/usr/bin/env bash
# README command 1: installs everything (scripts/setup.sh), then runs the main job on the
# built-in data: synth a healthy pretraining cohort and a clinical downstream cohort, pack
# both into HDF5 corpora, inspect them (text summary and a PNG of one subject each), a short
# pretraining of both stages (triplet, MEVP) at the paper preset on the healthy corpus with 2
# MPI ranks, then a small evaluation grid on the clinical corpus (jobs/demo_grid.txt: the three
# tasks on fold 0 of 2, pretrained vs scratch) and the report over it.
# Outputs go to demo-out/ (or $MTX_DEMO_OUT); the report is demo-out/eval/report/report.md.
#
# Every size is a setting, so the same script runs larger studies (docs/PERFORMANCE.md):
#   MTX_DEMO_OUT (demo-out), MTX_DEMO_HEALTHY (16), MTX_DEMO_CLINICAL (12) subjects,
#   MTX_DEMO_PRESET (paper; small and tiny pack at their own grids), MTX_DEMO_EPOCHS (2,
#   pretraining epochs per stage), MTX_DEMO_GRID (jobs/demo_grid.txt), MTX_DEMO_FOLDS (2),
#   MTX_DEMO_FT_EPOCHS (3, fine-tuning epochs), MTX_DEMO_FT_ARGS (more finetune options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=target/release/mtx-hpc
OUT=${MTX_DEMO_OUT:-demo-out}
HEALTHY=${MTX_DEMO_HEALTHY:-16}
CLINICAL=${MTX_DEMO_CLINICAL:-12}
PRESET=${MTX_DEMO_PRESET:-paper}
GRID=${MTX_DEMO_GRID:-jobs/demo_grid.txt}
case $PRESET in
paper) PACK=() ;;
small) PACK=(--grid 64,76,64 --spacing 3) ;;
tiny) PACK=(--grid 32,38,32 --spacing 6) ;;
*)
    echo "demo: MTX_DEMO_PRESET must be paper, small or tiny, not '$PRESET'" >&2
    exit 2
    ;;
esac
read -r -a FT_ARGS <<<"${MTX_DEMO_FT_ARGS:-}"
mkdir -p "$OUT"

# The real Colin27 T1 gives realistic anatomy when installed; the procedural phantom otherwise.
TEMPLATE=()
COLIN=/usr/share/mricron/templates/ch2bet.nii.gz
if [ -f "$COLIN" ]; then TEMPLATE=(--template "$COLIN"); fi

set -x
"$BIN" synth --cohort healthy --subjects "$HEALTHY" --seed 1 --out "$OUT/healthy" --force "${TEMPLATE[@]}"
"$BIN" synth --cohort clinical --subjects "$CLINICAL" --seed 2 --tumour-fraction 0.5 --out "$OUT/clinical" --force "${TEMPLATE[@]}"
"$BIN" pack --manifest "$OUT/healthy/manifest.csv" --out "$OUT/healthy.h5" --force "${PACK[@]}"
"$BIN" pack --manifest "$OUT/clinical/manifest.csv" --out "$OUT/clinical.h5" --force "${PACK[@]}"
# The first clinical subject with a tumour (column 8 = segmentation), to show the overlay.
TUMOUR=$(awk -F, 'NR > 1 && $8 != "" { print $1; exit }' "$OUT/clinical/manifest.csv")
TUMOUR=${TUMOUR:-CL0000}
"$BIN" inspect "$OUT/healthy.h5"
"$BIN" inspect "$OUT/clinical.h5"
"$BIN" inspect "$OUT/healthy.h5" --subject HC0000 --png "$OUT/HC0000.png"
"$BIN" inspect "$OUT/clinical.h5" --subject "$TUMOUR" --png "$OUT/$TUMOUR.png"
# Two data-parallel MPI ranks (one thread each), two epochs per stage at a global batch of 4
# (2 subjects per rank): a few minutes on 2 cores. OpenMPI refuses root without the two
# variables; they change nothing for other users.
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
mpirun -n 2 "$BIN" pretrain --corpus "$OUT/healthy.h5" --out "$OUT/pretrain" --preset "$PRESET" \
    --epochs "${MTX_DEMO_EPOCHS:-2}" --batch 4 --force
"$BIN" inspect "$OUT/pretrain/final.h5"
# The evaluation grid, one cell at a time (on a cluster: sbatch --array=0-N jobs/eval_array.slurm).
# Each cell fine-tunes from the run's best.h5 (or from scratch) and evaluates on fold 0's test
# subjects (--force: a rerun of the demo replaces the earlier evaluation).
CELLS=$(grep -cvE '^[[:space:]]*(#|$)' "$GRID")
for ((cell = 0; cell < CELLS; cell++)); do
    "$BIN" finetune --grid-file "$GRID" --cell "$cell" --corpus "$OUT/clinical.h5" \
        --checkpoint "$OUT/pretrain" --out "$OUT/eval" --folds "${MTX_DEMO_FOLDS:-2}" \
        --epochs "${MTX_DEMO_FT_EPOCHS:-3}" --force "${FT_ARGS[@]}"
done
"$BIN" report "$OUT/eval" --grid-file "$GRID"
set +x
echo "demo: done. Corpora, PNGs, the pretraining run and the evaluation are in $OUT/"
echo "demo: the report: $OUT/eval/report/report.md (plots: $OUT/eval/report/*.svg)"
