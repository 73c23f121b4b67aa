#!/usr/bin/env bash
# Stage 2 of the demo, after run_demo.sh: tokenizes a labelled demo image set (10 classes: the photo a crop comes
# from, the shape kind of a procedural image) with the demo FlexTok in bf16, trains a class-conditional AR generator
# on the ids (ar_demo.yaml), exports the whole FlexTokPipeline and samples a grid per class. One GPU, ~5 minutes.
#   bash training/demo/run_ar_demo.sh [OUTPUT_DIR]      # the tokenizer is read from OUTPUT_DIR/tokenizer/model
# The environment can shrink the run (a quick CPU check of the script with a tiny tokenizer):
#   NUM_IMAGES (4000; at least ~100, so that every class draws images), RESOLUTION (128, the tokenizer's image size), IMAGES_PER_CLASS (8), SAMPLING_STEPS (25),
#   AR_ARGS (more `--key value` settings for train_ar.py, e.g. "--max_train_steps 20 --model '{...}'").
set -euo pipefail
out=${1:-outputs/demo}
tokenizer="$out/tokenizer/model"
num_images=${NUM_IMAGES:-4000}
resolution=${RESOLUTION:-128}
python -c "from flextok_hf.training.demo_data import build_demo_image_folder as b
b('$out/data_classes', $num_images, $resolution, class_folders=True)"
python training/pretokenize.py --tokenizer "$tokenizer" --train_data "$out/data_classes/train" \
    --output_dir "$out/ar_tokens" --resolution "$resolution" --batch_size 128 --shard_size 1024 --flip --bf16
eval "extra_args=(${AR_ARGS:-})"  # word-split like a command line, quotes respected
accelerate launch --num_processes 1 training/train_ar.py --config training/configs/ar_demo.yaml \
    --token_data "$out/ar_tokens" --tokenizer_name_or_path "$tokenizer" --output_dir "$out/ar" \
    --export_pipeline true "${extra_args[@]}"
python training/demo/sample_class_grid.py --pipeline "$out/ar/model" --class_folder "$out/data_classes/train" \
    --output "$out/ar_samples.png" --images_per_class "${IMAGES_PER_CLASS:-8}" \
    --num_inference_steps "${SAMPLING_STEPS:-25}"
