"""Adaptive token budgets on photos and on simple synthetic images: how many tokens each gets, and what the search
costs.

    python benchmarks/adaptive_budgets.py --model outputs/demo/tokenizer/model --target 0.6 \\
        [--metric latent_mse] [--guidance-scale 1] [--steps 25] [--output benchmarks/results/adaptive_demo.json]

Three groups at the model's image size: the photos scikit-image and scikit-learn ship (center crops), procedural
images (a gradient with a few shapes, `flextok_hf.training.demo_data.procedural_image`) and flat colours. All go
through one `adaptive_tokenize` call (one seeded noise per image); the search's wall time is set beside one plain
`decode` of every image at all tokens with the same settings. Prints a table per group and writes JSON.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from flextok_hf import FlexTokModel
from flextok_hf.evaluation.adaptive import adaptive_tokenize
from flextok_hf.training.demo_data import bundled_photos, procedural_image


def image_groups(size: int, count: int, seed: int = 0) -> dict[str, dict[str, PIL.Image.Image]]:
    """`group -> {image name: image}`."""
    rng = np.random.default_rng(seed)
    photos = {}
    for name, photo in bundled_photos().items():
        height, width = photo.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        crop = PIL.Image.fromarray(photo[top : top + side, left : left + side])
        photos[name] = crop.resize((size, size), PIL.Image.BICUBIC)
    procedural = {f"procedural {i}": procedural_image(rng, size) for i in range(count)}
    flat = {
        f"flat {i}": PIL.Image.new("RGB", (size, size), tuple(rng.integers(0, 256, 3).tolist())) for i in range(count)
    }
    return {"photos": photos, "procedural": procedural, "flat colour": flat}


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a FlexTokModel folder or Hub id")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--metric", default="latent_mse", choices=["latent_mse", "psnr"])
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--images-per-group", type=int, default=8, help="procedural and flat-colour images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    model = FlexTokModel.from_pretrained(args.model).to(args.device).eval()
    groups = image_groups(model.config.image_size, args.images_per_group)
    names = [(group, name) for group, images in groups.items() for name in images]
    images = torch.stack([to_tensor(groups[group][name]) for group, name in names]).to(args.device)
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)

    start = time.perf_counter()
    result = adaptive_tokenize(
        model, images, args.target, metric=args.metric, generator=torch.Generator().manual_seed(0), **settings
    )
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        model.decode(model.encode(images), generator=torch.Generator().manual_seed(0), **settings)
    full_decode_s = time.perf_counter() - start

    rows = []
    for group in groups:
        members = [i for i, (image_group, _) in enumerate(names) if image_group == group]
        lengths = [int(result.lengths[i]) for i in members]
        rows.append(
            dict(
                group=group,
                images=len(members),
                mean_tokens=statistics.mean(lengths),
                median_tokens=statistics.median(lengths),
                met_target=sum(bool(result.met_target[i]) for i in members) / len(members),
                decodes_per_image=statistics.mean(int(result.num_decodes[i]) for i in members),
                tokens={names[i][1]: length for i, length in zip(members, lengths, strict=True)},
                scores={names[i][1]: round(float(result.scores[i]), 4) for i in members},
            )
        )
    summary = dict(
        model=args.model,
        metric=args.metric,
        target=args.target,
        device=str(model.device),
        settings=settings,
        search_seconds=search_s,
        full_decode_seconds=full_decode_s,
        decode_calls=result.num_decode_calls,
        rows=rows,
    )

    print(f"{args.metric} target {args.target}, {args.steps} steps, guidance {args.guidance_scale}, {model.device}\n")
    print("| images | count | mean tokens | median | met target | decodes per image | tokens per image |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['group']} | {row['images']} | {row['mean_tokens']:.1f} | {row['median_tokens']:g} | "
            f"{row['met_target']:.0%} | {row['decodes_per_image']:.1f} | {' '.join(map(str, row['tokens'].values()))} |"
        )
    print(
        f"\nsearch: {search_s:.1f} s in {result.num_decode_calls} batched decode calls; one decode of all "
        f"{len(images)} images at all tokens: {full_decode_s:.1f} s ({search_s / full_decode_s:.1f}x)"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
