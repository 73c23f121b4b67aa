"""Samples a grid from a class-conditional FlexTokPipeline: one row per class, its name on the left.

    python training/demo/sample_class_grid.py --pipeline outputs/demo/ar/model --output outputs/demo/ar_samples.png \
        --class_folder outputs/demo/data_classes/train --images_per_class 8
"""

import argparse
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.utils import make_image_grid

from flextok_hf import FlexTokPipeline

LABEL_WIDTH = 120


def class_names(class_folder: str | None, num_classes: int) -> list[str]:
    """The image folder's class subfolders in the order `imagefolder` numbers them (sorted), else the class ids."""
    if class_folder is None:
        return [str(label) for label in range(num_classes)]
    names = sorted(path.name for path in Path(class_folder).iterdir() if path.is_dir())
    if len(names) != num_classes:
        raise ValueError(f"{class_folder} has {len(names)} class folders, the generator {num_classes} classes.")
    return names


def labelled_rows(grid: PIL.Image.Image, names: list[str]) -> PIL.Image.Image:
    """`grid` (one row per name) with a white margin on the left that names each row."""
    canvas = PIL.Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height), "white")
    canvas.paste(grid, (LABEL_WIDTH, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    row_height = grid.height // len(names)
    for row, name in enumerate(names):
        draw.text((4, row * row_height + row_height // 2), name, fill="black", anchor="lm")
    return canvas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="FlexTokPipeline folder (train_ar.py --export_pipeline)")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--class_folder", help="the training image folder, to name the rows by its class folders")
    parser.add_argument("--images_per_class", type=int, default=8)
    parser.add_argument("--num_tokens", type=int, help="tokens per image (default: all)")
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pipeline = FlexTokPipeline.from_pretrained(args.pipeline).to(args.device)
    names = class_names(args.class_folder, pipeline.ar_model.config.num_classes)
    images = pipeline(
        class_labels=list(range(len(names))),
        num_images_per_prompt=args.images_per_class,
        num_tokens=args.num_tokens,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    ).images
    grid = make_image_grid(images, rows=len(names), cols=args.images_per_class)
    labelled_rows(grid, names).save(args.output)
    print(f"Wrote {args.output}: {len(names)} classes x {args.images_per_class} samples")


if __name__ == "__main__":
    main()
