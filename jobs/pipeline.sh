#!/usr/bin/env bash
# Submits the whole chain as Slurm jobs, each starting only when the previous one succeeded
# (--dependency=afterok; --kill-on-invalid-dep=yes cancels the rest of the chain when one
# fails instead of leaving it pending forever):
#
#   1. pack      mtx-hpc pack: manifest -> corpus (skipped when the corpus exists already)
#   2. pretrain  jobs/pretrain.slurm (MPI, requeued on preemption until finished)
#   3. downstream  jobs/eval_array.slurm, one array task per cell of the grid file MTX_GRID,
#                at most MTX_ARRAY_THROTTLE at once (--array=0-(N-1)%T), fine-tuning from the
#                run's best.h5 on MTX_EVAL_CORPUS; submitted when MTX_EVAL_CORPUS is set
#
#   MTX_MANIFEST=data/healthy/manifest.csv MTX_CORPUS=data/healthy.h5 MTX_RUN_NAME=r1 jobs/pipeline.sh
#   jobs/pipeline.sh --dry-run        # print the sbatch commands only
#
# Run it from the repository (or set MTX_BIN). It prints the job ids; follow them with
# `squeue -u $USER`. A requeued pretraining job keeps its id, so the array still waits for it.
#
# Settings (environment):
#   MTX_BIN               the mtx-hpc binary (default: mtx-hpc on PATH, else target/release/mtx-hpc)
#   MTX_MANIFEST          manifest CSV for pack (needed when MTX_CORPUS does not exist yet)
#   MTX_CORPUS            the corpus (.h5) pack writes and pretraining reads (required)
#   MTX_PACK_ARGS         more `mtx-hpc pack` options (e.g. "--grid 64,76,64 --spacing 3")
#   MTX_PACK_CPUS         CPUs of the pack job (default 8)
#   MTX_PACK_TIME         time limit of the pack job (default 02:00:00)
#   MTX_RUN_NAME          the pretraining run's name (default: pretrain)
#   MTX_PRETRAIN_SBATCH   more sbatch options for pretraining (e.g. "--nodes=4 --time=2-00:00:00")
#   MTX_EVAL_CORPUS       the packed clinical corpus of the downstream tasks; unset (the
#                         default) submits no array
#   MTX_GRID              the grid file (default: jobs/eval_grid.txt); its cell count is the
#                         array size (MTX_DOWNSTREAM_TASKS overrides it)
#   MTX_EVAL_DIR          the array's output root (default: eval); then `mtx-hpc report`
#   MTX_DOWNSTREAM_SCRIPT the array job script (default: jobs/eval_array.slurm)
#   MTX_ARRAY_THROTTLE    array tasks running at once (default 8)
#   MTX_SBATCH_ARGS       sbatch options for every job (e.g. "--account=abc --partition=cpu")
# Every other MTX_* variable (MTX_PRESET, MTX_EPOCHS, MTX_BATCH, ...) reaches
# jobs/pretrain.slurm through the environment (sbatch exports it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dry=0
case "${1:-}" in
--dry-run) dry=1 ;;
"") ;;
*)
    echo "usage: $0 [--dry-run]" >&2
    exit 2
    ;;
esac

if [ -z "${MTX_BIN:-}" ]; then
    MTX_BIN=$(command -v mtx-hpc || echo "$here/../target/release/mtx-hpc")
fi
MTX_BIN=$(realpath -m "$MTX_BIN")
[ -x "$MTX_BIN" ] || [ "$dry" = 1 ] || {
    echo "pipeline.sh: $MTX_BIN is not an executable: set MTX_BIN" >&2
    exit 2
}
: "${MTX_CORPUS:?set MTX_CORPUS to the corpus (.h5) to pack and train on}"
MTX_CORPUS=$(realpath -m "$MTX_CORPUS")
export MTX_BIN MTX_CORPUS
export MTX_RUN_NAME=${MTX_RUN_NAME:-pretrain}
grid=$(realpath -m "${MTX_GRID:-$here/eval_grid.txt}")
tasks=0
if [ -n "${MTX_EVAL_CORPUS:-}" ]; then
    [ -f "$grid" ] || {
        echo "pipeline.sh: grid file $grid does not exist: set MTX_GRID" >&2
        exit 2
    }
    tasks=${MTX_DOWNSTREAM_TASKS:-$(grep -cvE '^[[:space:]]*(#|$)' "$grid")}
fi
throttle=${MTX_ARRAY_THROTTLE:-8}
downstream=${MTX_DOWNSTREAM_SCRIPT:-$here/eval_array.slurm}
read -r -a common <<<"${MTX_SBATCH_ARGS:-}"

# Runs sbatch (or prints it) and echoes the job id.
submit() {
    if [ "$dry" = 1 ]; then
        echo "sbatch $*" >&2
        echo "DRYRUN$RANDOM"
        return
    fi
    local out
    out=$(sbatch --parsable "${common[@]}" "$@")
    echo "${out%%;*}"
}

dep=()
if [ -e "$MTX_CORPUS" ]; then
    echo "pipeline.sh: $MTX_CORPUS exists: no pack job"
else
    : "${MTX_MANIFEST:?set MTX_MANIFEST: $MTX_CORPUS does not exist yet and must be packed}"
    manifest=$(realpath -m "$MTX_MANIFEST")
    read -r -a pack_args <<<"${MTX_PACK_ARGS:-}"
    cpus=${MTX_PACK_CPUS:-8}
    # --wrap runs a one-line batch script; quote each word for that shell.
    cmd=$(printf '%q ' "$MTX_BIN" pack --manifest "$manifest" --out "$MTX_CORPUS" \
        "${pack_args[@]}")
    pack=$(submit --job-name=mtx-pack --ntasks=1 --cpus-per-task="$cpus" \
        --time="${MTX_PACK_TIME:-02:00:00}" --output="mtx-pack-%j.out" \
        --wrap="export HDF5_USE_FILE_LOCKING=FALSE; $cmd--threads \$SLURM_CPUS_PER_TASK")
    echo "pipeline.sh: pack      job $pack"
    dep=(--dependency="afterok:$pack" --kill-on-invalid-dep=yes)
fi

read -r -a pre_args <<<"${MTX_PRETRAIN_SBATCH:-}"
pretrain=$(submit "${dep[@]}" --job-name="$MTX_RUN_NAME" "${pre_args[@]}" \
    "$here/pretrain.slurm")
echo "pipeline.sh: pretrain  job $pretrain (run folder ${MTX_RUNS_DIR:-runs}/$MTX_RUN_NAME)"

if [ "$tasks" -gt 0 ]; then
    # Fine-tune + evaluate one grid cell per SLURM_ARRAY_TASK_ID from the run's best
    # checkpoint, on the clinical corpus.
    [ -f "$downstream" ] || [ "$dry" = 1 ] || {
        echo "pipeline.sh: $downstream does not exist: set MTX_DOWNSTREAM_SCRIPT" >&2
        exit 2
    }
    export MTX_CHECKPOINT=${MTX_CHECKPOINT:-$(realpath -m "${MTX_RUNS_DIR:-runs}/$MTX_RUN_NAME")}
    export MTX_GRID=$grid
    array=$(MTX_CORPUS=$(realpath -m "$MTX_EVAL_CORPUS") submit \
        --dependency="afterok:$pretrain" --kill-on-invalid-dep=yes \
        --array="0-$((tasks - 1))%$throttle" "$downstream")
    echo "pipeline.sh: downstream array job $array (tasks 0-$((tasks - 1)), at most $throttle at once)"
    echo "pipeline.sh: then: mtx-hpc report ${MTX_EVAL_DIR:-eval} --grid-file $grid"
fi
