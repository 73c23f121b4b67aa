#!/usr/bin/env bash
# Trains the demo VAE, then the demo FlexTok on its latents, on the offline demo image set, and evaluates the
# tokenizer on held-out photos: does it read its tokens (token_dependence.png / .json), reconstruction grid and
# error per token budget (rate_distortion.png, results.md / .csv / .json). One GPU, about 7 minutes.
#   bash training/demo/run_demo.sh [OUTPUT_DIR]
set -euo pipefail
out=${1:-outputs/demo}
python -c "from flextok_hf.training.demo_data import build_demo_image_folder as b; b('$out/data', 3000, 128)"
accelerate launch --num_processes 1 --mixed_precision bf16 training/train_vae.py \
    --config training/configs/vae_demo_128.yaml --train_data "$out/data/train" --output_dir "$out/vae"
accelerate launch --num_processes 1 --mixed_precision bf16 training/train_tokenizer.py \
    --config training/configs/tokenizer_demo_128.yaml --train_data "$out/data/train" \
    --vae_name_or_path "$out/vae/model" --output_dir "$out/tokenizer"
python training/demo/plot_token_dependence.py --run "$out/tokenizer" --images "$out/data/test" \
    --output_dir "$out/evaluation"
flextok-hf evaluate "$out/data/test" --model "$out/tokenizer/model" \
    --output-dir "$out/evaluation" --steps 25 --grid 6
