#!/usr/bin/env bash
# Animate every image in prompts/<resolution>/ into results/, like the original run.sh.
#
#   ./scripts/run_pipeline.sh <resolution> [seed] [device] [run_pipeline.py options...]
#
# Runs from the repository root, so relative paths in the options are relative to it.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $0 <resolution> [seed] [device] [run_pipeline.py options...]
  resolution  256, 512, 1024 or 512_interp
  seed        random seed, a non-negative integer (default: 123)
  device      torch device such as cuda:1 or cpu (default: cuda:0, or cpu without CUDA)
Example: $0 256 123 cuda:0 --num_inference_steps 25
USAGE
}

case "${1:-}" in
    256 | 512 | 1024 | 512_interp) resolution=$1; shift ;;
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

cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" scripts/run_pipeline.py "$resolution" --seed "$seed" ${device[@]+"${device[@]}"} "$@"
