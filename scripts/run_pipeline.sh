#!/usr/bin/env bash
# Animate every image in prompts/<resolution>/ into results/, like the original run.sh.
#
#   ./scripts/run_pipeline.sh <resolution> [seed] [device] [--gpus N] [run_pipeline.py options...]
#
# Runs from the repository root, so relative paths in the options are relative to it.
# With --gpus N (N > 1) the run is spread over N processes with torchrun, one per GPU.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $0 <resolution> [seed] [device] [--gpus N] [run_pipeline.py options...]
  resolution  256, 512, 1024, 512_interp or tooncrafter
  seed        random seed, a non-negative integer (default: 123)
  device      torch device such as cuda:1 or cpu (default: cuda:0, or cpu without CUDA)
  --gpus N    spread the images over N GPUs of this machine (torchrun, one process per GPU)
Example: $0 256 123 cuda:0 --num_inference_steps 25
         $0 512 123 --gpus 8
USAGE
}

case "${1:-}" in
    256 | 512 | 1024 | 512_interp | tooncrafter) resolution=$1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 1 ;;
esac

seed=123
if [[ $# -gt 0 && $1 != -* ]]; then
    seed=$1
    shift
    if [[ ! $seed =~ ^[0-9]+$ ]]; then
        echo "Seed must be a non-negative integer, got '$seed'." >&2
        usage >&2
        exit 1
    fi
fi

device=()
if [[ $# -gt 0 && $1 != -* ]]; then
    device=(--device "$1")
    shift
fi

gpus=1
options=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --gpus)
            if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
                echo "--gpus needs a positive whole number." >&2
                exit 1
            fi
            gpus=$2
            shift 2
            ;;
        *) options+=("$1"); shift ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
args=("$resolution" --seed "$seed" ${device[@]+"${device[@]}"} ${options[@]+"${options[@]}"})
if [[ $gpus -gt 1 ]]; then
    exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$gpus" scripts/run_pipeline.py "${args[@]}"
fi
exec "$python" scripts/run_pipeline.py "${args[@]}"
