"""Tokenize an image dataset with a frozen FlexTok tokenizer into parquet shards for stage-2 training.

    python training/pretokenize.py --tokenizer path/or/hub-id --train_data "shards/*.tar" --output_dir data/tokens \
        --batch_size 64 --flip --bf16

Resumable: finished shards are kept and their examples skipped when the command is run again. The images are written
in an order drawn from `--seed` (an image folder's images, or the .tar / .parquet files; a Hub dataset keeps its
order): an image folder lists its classes one after another, and the AR training reads the shards in order.
"""

import argparse

import torch

from flextok_hf import FlexTokModel
from flextok_hf.training.data import SkipCounter, build_image_stream
from flextok_hf.training.pretokenize import pretokenize


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="FlexTok model: a folder (either format) or a Hub id")
    parser.add_argument("--train_data", required=True, help="image folder, *.tar / *.parquet glob or Hub dataset")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset_split", "--split", dest="split", default="train", help="split of a Hub dataset")
    parser.add_argument("--image_column")
    parser.add_argument("--label_column")
    parser.add_argument("--caption_column")
    parser.add_argument("--resolution", type=int, help="image size (default: the tokenizer's config.image_size)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=4096)
    parser.add_argument("--max_examples", type=int)
    parser.add_argument("--seed", type=int, default=0, help="draws the order of the images (the same on resume)")
    parser.add_argument("--flip", action="store_true", help="also store the ids of each mirrored image")
    parser.add_argument("--bf16", action="store_true", help="run the tokenizer in bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = FlexTokModel.from_pretrained(args.tokenizer, torch_dtype=dtype).to(args.device).eval()
    skipped = SkipCounter()
    stream = build_image_stream(
        args.train_data,
        split=args.split,
        resolution=args.resolution or model.config.image_size,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
        seed=args.seed,
        shuffle=True,
        stats=skipped,
    )
    shards = pretokenize(model, stream, args.output_dir, args.shard_size, args.batch_size, args.flip, args.max_examples)
    counts = skipped.as_dict()
    print(
        f"{len(shards)} shards in {args.output_dir}; this run read {counts['images_seen']} images and skipped "
        f"{counts['skipped_corrupt']} undecodable ones"
    )


if __name__ == "__main__":
    main()
