"""Reconstruction quality per token budget (FlexTok's rate-distortion curve) and per decoding cost.

Each image is encoded once. For every sampler setting (scheduler x number of steps) the prefixes of all budgets then
go through the decoder together, in one batched `decode`, since any prefix of FlexTok's ordered tokens decodes to an
image. Every setting draws the same initial noise, so their rows differ only by the sampler.

    flextok-hf evaluate FOLDER --model PATH --output-dir results
    flextok-hf evaluate ... --budgets 16 256 --steps 4 8 16 25 --samplers euler heun
"""

import csv
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, SchedulerMixin
from torch import nn
from torchmetrics.regression import MeanSquaredError
from tqdm.auto import tqdm

from ..modeling_flextok import FlexTokModel
from ..utils import is_int
from .metrics import build_metrics, check_image_count

# First- and second-order flow-matching samplers by name (the command line's --samplers).
SAMPLERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def power_of_two_budgets(num_registers: int) -> list[int]:
    """1, 2, 4, ... up to `num_registers` (included even when it is no power of two)."""
    budgets = [2**i for i in range(num_registers.bit_length()) if 2**i <= num_registers]
    return budgets if budgets[-1] == num_registers else budgets + [num_registers]


def image_batches(
    source: str,
    resolution: int,
    batch_size: int,
    max_images: int | None = None,
    split: str = "train",
    image_column: str | None = None,
):
    """Batches `[B, 3, R, R]` in [-1, 1] of the images of a folder, shard glob or dataset (center crops); `split`
    and `image_column` as `build_image_stream` takes them."""
    from ..training.data import build_image_stream, collated_batches

    stream = build_image_stream(source, split, resolution=resolution, image_column=image_column)
    stream = itertools.islice(stream, max_images)
    for batch in collated_batches(stream, batch_size):
        yield batch["pixel_values"]


def evaluation_split(source: str) -> str:
    """The split to evaluate when none is named: a Hub dataset's "validation"; a folder's validation split folder
    if it has one, else all its images, which `datasets` calls "train"."""
    folder = Path(source)
    if not folder.is_dir():
        return "validation"
    has_validation = any((folder / name).is_dir() for name in ("validation", "valid", "val", "dev"))
    return "validation" if has_validation else "train"


class CachedOriginals(nn.Module):
    """A feature extractor that computes the features of the current batch of originals once, not once per
    (setting, budget) whose metrics compare with them."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        if hasattr(extractor, "num_features"):
            self.num_features = extractor.num_features  # read by torchmetrics' FID instead of probing the network
        self.originals = self.features = None

    def set_originals(self, originals: torch.Tensor):
        self.originals, self.features = originals, None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images is not self.originals:
            return self.extractor(images)
        if self.features is None:
            self.features = self.extractor(images)
        return self.features


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """`[-1, 1]` -> `[0, 1]`, clamped (decoded images overshoot a little); contiguous, as torchmetrics' MAE/MSE
    `view` their inputs."""
    return ((images.float() + 1) / 2).clamp(0, 1).contiguous()


@torch.no_grad()
def evaluate_token_budgets(
    model: FlexTokModel,
    images: torch.Tensor | Iterable[torch.Tensor] | str | Path,
    budgets: Sequence[int] | None = None,
    num_inference_steps: int | Sequence[int] = 25,
    schedulers: dict[str, SchedulerMixin] | None = None,
    guidance_scale: float = 7.5,
    norm_guidance: bool = True,
    metrics: Iterable[str] | None = None,
    feature_extractor: nn.Module | None = None,
    perceptual_extractor: nn.Module | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_images: int | None = None,
    split: str | None = None,
    image_column: str | None = None,
    keep_images: int = 0,
) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Mean reconstruction metrics per token budget and sampler setting.

    Args:
        model ([`FlexTokModel`]): the tokenizer.
        images: a tensor `[N, 3, H, W]` in [-1, 1], evaluated in batches of `batch_size`; batches of such images
            (any iterable, e.g. a DataLoader; dict batches are read at "pixel_values"); or a folder / shard glob /
            dataset name, read in `batch_size` center crops at `config.image_size`.
        budgets (`list[int]`): token counts, default 1, 2, 4, ..., `config.num_registers`.
        num_inference_steps (`int` or list): decoding steps; each value is a setting.
        schedulers (`dict[str, SchedulerMixin]`): sampler name -> scheduler given to `decode`
            (`FlowMatchEulerDiscreteScheduler` or the second-order `FlowMatchHeunDiscreteScheduler`); each is a
            setting. Default `{"euler": FlowMatchEulerDiscreteScheduler()}`.
        guidance_scale, norm_guidance: passed to `decode`.
        metrics, feature_extractor, perceptual_extractor: which metrics, as in [`build_metrics`] (rFID needs a
            feature extractor, the perceptual distance an embedding model).
        seed (`int`): seeds the initial noise, the same for every setting.
        max_images (`int`, *optional*): evaluate only the first this many images.
        split (`str`, *optional*): the split of a dataset name, or of a folder with split subfolders (`train/`,
            `val/`, ...). By default a dataset's "validation", a folder's validation subfolder if it has one, else
            all its images (the split "train" to `datasets`).
        image_column (`str`, *optional*): the image column of a dataset, found by name by default.
        keep_images (`int`): keep the first setting's reconstructions of this many images (for a grid).

    Returns:
        `(rows, kept)`: one row per (sampler, steps, budget), `{"sampler", "steps", "nfe" (decoder evaluations per
        image: `steps` for Euler, `2 * steps - 1` for Heun; guidance runs each on a doubled batch), "tokens",
        "latent_mse" (decoded vs. encoded VAE latents), <metrics>, "images"}`; and the kept images
        `{budget: [n, 3, H, W] in [0, 1]}`, budget 0 the originals.
    """
    num_registers = model.config.num_registers
    budgets = power_of_two_budgets(num_registers) if budgets is None else list(budgets)
    valid = budgets and all(is_int(k) and 1 <= k <= num_registers for k in budgets)
    if not valid or len(set(budgets)) < len(budgets):
        raise ValueError(f"budgets must be distinct integers in [1, {num_registers}], got {budgets}.")
    budgets = [int(k) for k in budgets]
    steps = [num_inference_steps] if is_int(num_inference_steps) else list(num_inference_steps)
    if not steps or not all(is_int(n) and n >= 1 for n in steps):
        raise ValueError(f"num_inference_steps must be positive integers, got {num_inference_steps}.")
    steps = [int(n) for n in steps]
    schedulers = {"euler": FlowMatchEulerDiscreteScheduler()} if schedulers is None else schedulers
    if not schedulers:
        raise ValueError("schedulers must name at least one scheduler, got none.")
    if max_images is not None and not (is_int(max_images) and max_images >= 1):
        raise ValueError(f"max_images must be a positive integer, got {max_images!r}.")

    settings = [(name, scheduler, n) for name, scheduler in schedulers.items() for n in steps]
    generators = [torch.Generator().manual_seed(seed) for _ in settings]
    encode_generator = torch.Generator().manual_seed(seed)  # VAE posterior samples, if the model draws them
    extractors = [CachedOriginals(e) if e is not None else None for e in (feature_extractor, perceptual_extractor)]
    image_metrics = {
        (s, k): build_metrics(metrics, *extractors).to(model.device) for s in range(len(settings)) for k in budgets
    }
    latent_mse = {key: MeanSquaredError().to(model.device) for key in image_metrics}
    frechet = "fid" in image_metrics[0, budgets[0]]
    if isinstance(images, torch.Tensor):
        images = images[:max_images]
        check_image_count(len(images), frechet)  # before decoding, where the count is known
        images = images.split(batch_size)
    elif isinstance(images, (str, Path)):
        split = split or evaluation_split(str(images))
        images = image_batches(str(images), model.config.image_size, batch_size, max_images, split, image_column)
    nfe = {}
    kept: dict[int, list[torch.Tensor]] = {k: [] for k in [0, *budgets]}
    count = 0
    for batch in tqdm(images, desc="Evaluating", unit="batch", disable=None):  # None: only on a terminal
        batch = batch["pixel_values"] if isinstance(batch, dict) else batch
        if max_images is not None:
            batch = batch[: max_images - count]
        encoded = model.encode(batch, return_dict=True, generator=encode_generator)
        originals = to_unit_range(batch).to(model.device)
        for extractor in filter(None, extractors):
            extractor.set_originals(originals)
        encoded_latents = encoded.latents.float().contiguous()  # torchmetrics' MSE `view`s its inputs
        prefixes = [ids[:k] for k in budgets for ids in encoded.token_ids]
        keep = max(0, min(len(batch), keep_images - count))
        for s, ((_, scheduler, num_steps), generator) in enumerate(zip(settings, generators, strict=True)):
            output = model.decode(
                prefixes,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                norm_guidance=norm_guidance,
                generator=generator,
                height=batch.shape[2],
                width=batch.shape[3],
                scheduler=scheduler,
            )
            nfe[s] = len(scheduler.timesteps)  # as set by this decode, which evaluates the decoder once per entry
            reconstructions = to_unit_range(output.images).split(len(batch))
            for k, reconstructed, latents in zip(
                budgets, reconstructions, output.latents.split(len(batch)), strict=True
            ):
                image_metrics[s, k].update(reconstructed, originals)
                latent_mse[s, k].update(latents.contiguous(), encoded_latents)
                if s == 0 and keep:
                    kept[k].append(reconstructed[:keep].cpu())
        if keep:
            kept[0].append(originals[:keep].cpu())
        count += len(batch)
        if count == max_images:
            break
    check_image_count(count, frechet)

    rows = []
    for s, (name, _, num_steps) in enumerate(settings):
        for k in budgets:
            row = {"sampler": name, "steps": num_steps, "nfe": nfe[s], "tokens": k}
            row["latent_mse"] = latent_mse[s, k].compute().item()
            row.update({metric: value.item() for metric, value in image_metrics[s, k].compute().items()})
            row["images"] = count
            rows.append(row)
    return rows, {k: torch.cat(v) for k, v in kept.items() if v}


def plot_curves(rows: list[dict], x: str, group_by: tuple[str, ...], path: Path, title: str):
    """One panel per metric, `x` on a log2 axis, one line per distinct value of the `group_by` columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [name for name in ("psnr", "ssim", "latent_mse", "fid", "perceptual") if name in rows[0]]
    groups = {tuple(row[key] for key in group_by) for row in rows}
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for group in sorted(groups):
            points = sorted((row[x], row[metric]) for row in rows if tuple(row[key] for key in group_by) == group)
            label = ", ".join(f"{key} {value}" for key, value in zip(group_by, group, strict=True))
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(x)
        axis.set_title(metric)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels, not on them
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def write_report(rows: list[dict], output_dir: str | Path, title: str = "Reconstruction per token budget"):
    """`results.md` (markdown table), `results.csv`, `results.json` and `rate_distortion.png` (metrics against
    tokens) in `output_dir`; with several sampler settings also `decoding_cost.png` (metrics against decoder
    passes per image)."""
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
    plot_curves(rows, "tokens", ("sampler", "steps"), output_dir / "rate_distortion.png", title)
    if len({(row["sampler"], row["steps"]) for row in rows}) > 1:
        plot_curves(rows, "nfe", ("sampler", "tokens"), output_dir / "decoding_cost.png", title)


def save_reconstruction_grid(reconstructions: dict[int, torch.Tensor], path: str | Path):
    """A PNG with one row per image: the original, then its reconstruction at each budget (left to right)."""
    columns = [reconstructions[k] for k in sorted(reconstructions)]
    rows = torch.cat([torch.cat(list(images), dim=2) for images in zip(*columns, strict=True)], dim=1)
    pixels = (rows.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path)
