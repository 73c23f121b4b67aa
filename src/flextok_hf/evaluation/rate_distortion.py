"""Reconstruction quality per token budget: FlexTok's rate-distortion curve.

Each image is encoded once; the prefixes of all budgets then go through the decoder together (one batched
`decode`), since any prefix of FlexTok's ordered tokens decodes to an image.
"""

import csv
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from ..modeling_flextok import FlexTokModel


def power_of_two_budgets(num_registers: int) -> list[int]:
    """1, 2, 4, ... up to `num_registers` (included even when it is no power of two)."""
    budgets = [2**i for i in range(num_registers.bit_length()) if 2**i <= num_registers]
    return budgets if budgets[-1] == num_registers else budgets + [num_registers]


def image_metrics(reconstructions: torch.Tensor, originals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MAE, MSE, PSNR (dB) and SSIM of images `[B, 3, H, W]` in [0, 1] (torchmetrics)."""
    errors = reconstructions - originals
    return {
        "mae": errors.abs().flatten(1).mean(1),
        "mse": errors.pow(2).flatten(1).mean(1),
        "psnr": peak_signal_noise_ratio(reconstructions, originals, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(reconstructions, originals, data_range=1.0, reduction="none"),
    }


@torch.no_grad()
def evaluate_token_budgets(
    model: FlexTokModel,
    batches: Iterable[torch.Tensor],
    budgets: list[int] | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    norm_guidance: bool = True,
    seed: int = 0,
    keep_images: int = 0,
) -> tuple[list[dict[str, float]], dict[int, torch.Tensor]]:
    """Mean metrics per token budget over `batches` of images `[B, 3, H, W]` in [-1, 1].

    Returns rows `{"tokens", "latent_mse", "mae", "mse", "psnr", "ssim", "images"}` (one per budget) and, for the
    first `keep_images` images, their reconstructions per budget (`{budget: [n, 3, H, W] in [0, 1]}`, budget 0 the
    originals)."""
    budgets = budgets or power_of_two_budgets(model.config.num_registers)
    totals: dict[int, dict[str, float]] = {k: {} for k in budgets}
    kept: dict[int, list[torch.Tensor]] = {k: [] for k in [0, *budgets]}
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for images in tqdm(batches, desc="Evaluating", unit="batch"):
        encoded = model.encode(images, return_dict=True)
        originals = ((images.float() + 1) / 2).clamp(0, 1).to(model.device)
        prefixes = [ids[:k] for k in budgets for ids in encoded.token_ids]
        output = model.decode(
            prefixes,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            norm_guidance=norm_guidance,
            generator=generator,
            height=images.shape[2],
            width=images.shape[3],
        )
        batch = len(images)
        reconstructions = ((output.images.float() + 1) / 2).clamp(0, 1).split(batch)
        latents = output.latents.split(batch)
        for k, reconstructed, decoded_latents in zip(budgets, reconstructions, latents, strict=True):
            values = image_metrics(reconstructed, originals)
            values["latent_mse"] = (
                F.mse_loss(decoded_latents, encoded.latents.float(), reduction="none").flatten(1).mean(1)
            )
            for name, per_image in values.items():
                totals[k][name] = totals[k].get(name, 0.0) + per_image.sum().item()
            if count < keep_images:
                kept[k].append(reconstructed[: keep_images - count].cpu())
        if count < keep_images:
            kept[0].append(originals[: keep_images - count].cpu())
        count += batch
    rows = [
        {"tokens": k, **{name: total / count for name, total in totals[k].items()}, "images": count} for k in budgets
    ]
    return rows, {k: torch.cat(v) for k, v in kept.items() if v}


def write_report(rows: list[dict[str, float]], output_dir: str | Path, title: str = "Reconstruction per token budget"):
    """`results.md` (markdown table), `results.csv`, `results.json` and `rate_distortion.png` in `output_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |"
        for row in rows
    ]
    (output_dir / "results.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
    with open(output_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    metrics = [name for name in ("psnr", "ssim", "latent_mse") if name in columns]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for axis, name in zip(np.atleast_1d(axes), metrics, strict=True):
        axis.plot([row["tokens"] for row in rows], [row[name] for row in rows], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output_dir / "rate_distortion.png", dpi=120)
    plt.close(figure)


def save_reconstruction_grid(reconstructions: dict[int, torch.Tensor], path: str | Path):
    """A PNG with one row per image: the original, then its reconstruction at each budget (left to right)."""
    columns = [reconstructions[k] for k in sorted(reconstructions)]
    rows = torch.cat([torch.cat(list(images), dim=2) for images in zip(*columns, strict=True)], dim=1)
    pixels = (rows.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path)


def image_batches(source: str, resolution: int, batch_size: int, max_images: int | None = None):
    """Batches `[B, 3, R, R]` in [-1, 1] of the images of a folder, shard glob or dataset (center crops)."""
    import itertools

    from ..training.data import build_image_stream, collate_images

    stream = itertools.islice(build_image_stream(source, resolution=resolution), max_images)
    while examples := list(itertools.islice(stream, batch_size)):
        yield collate_images(examples)["pixel_values"]


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Reconstruction quality of a FlexTok tokenizer per token budget.")
    parser.add_argument("--model", required=True, help="FlexTok model folder (either format) or Hub id")
    parser.add_argument("--images", required=True, help="image folder, .tar/.parquet glob or Hub dataset")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_images", type=int)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--grid", type=int, default=0, help="also save a grid of this many images' reconstructions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = FlexTokModel.from_pretrained(args.model).to(args.device).eval()
    batches = image_batches(args.images, model.config.image_size, args.batch_size, args.max_images)
    rows, kept = evaluate_token_budgets(
        model, batches, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, keep_images=args.grid
    )
    write_report(rows, args.output_dir, title=f"{args.model} on {args.images}")
    if kept:
        save_reconstruction_grid(kept, Path(args.output_dir) / "reconstructions.png")
    print((Path(args.output_dir) / "results.md").read_text())


if __name__ == "__main__":
    main()
