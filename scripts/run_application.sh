#!/usr/bin/env bash
# Frame interpolation or looping with the 512_interp model, like the original run_application.sh.
#
#   ./scripts/run_application.sh interp|loop [seed] [device] [--gpus N] [run_pipeline.py options...]
#
# interp: every pair of consecutive images in prompts/512_interp/ (seed 12306);
# loop:   every image in prompts/512_loop/ becomes a seamless loop (seed 234).
# The original's settings: 320x512, 16 frames, frame rate 5, 50 steps, guidance 7.5, eta 1,
# uniform_trailing timesteps, guidance rescale 0.7. Later options override them.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $0 interp|loop [seed] [device] [--gpus N] [run_pipeline.py options...]
  interp      one video between each pair of images in prompts/512_interp/ (default seed 12306)
  loop        one looping video per image in prompts/512_loop/ (default seed 234)
  seed        random seed, a non-negative integer
  device      torch device such as cuda:1 or cpu (default: cuda:0, or cpu without CUDA)
  --gpus N    spread the images over N GPUs of this machine (torchrun, one process per GPU)
Example: $0 interp
         $0 loop 234 cuda:1 --prompt_dir my_images/
USAGE
}

case "${1:-}" in
    interp) mode=interp; seed=12306 ;;
    loop) mode=loop; seed=234 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 1 ;;
esac
shift
if [[ $# -gt 0 && $1 != -* ]]; then
    seed=$1
    shift
fi

here=$(dirname "${BASH_SOURCE[0]}")
# Positional seed and device are handled by run_pipeline.sh; the original's settings follow them.
positional=("$seed")
if [[ $# -gt 0 && $1 != -* ]]; then
    positional+=("$1")
    shift
fi
exec "$here/run_pipeline.sh" 512_interp "${positional[@]}" "--$mode" \
    --prompt_dir "prompts/512_$mode/" --output_dir "results/dynamicrafter_512_${mode}_seed$seed" \
    --height 320 --width 512 --video_length 16 --frame_stride 5 --num_inference_steps 50 \
    --guidance_scale 7.5 --eta 1.0 --timestep_spacing uniform_trailing --guidance_rescale 0.7 "$@"
