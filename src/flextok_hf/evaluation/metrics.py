"""Image metrics on images `[B, 3, H, W]` in [0, 1], computed by torchmetrics.

MAE, MSE, PSNR, SSIM and the Frechet distance (rFID between images and their reconstructions, gFID between real
and generated sets) are torchmetrics' own; the Frechet distance runs on whatever feature extractor is passed (see
`features.py`). torchmetrics' LPIPS and CLIPScore are tied to fixed networks, so the perceptual distance and the
image-text score are two small `torchmetrics.Metric`s over pluggable extractors.
"""

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import evaluate
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics.image exports it only with torch-fidelity
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

PIXEL_METRICS = ("mae", "mse", "psnr", "ssim")
EVALUATE_MODULES = Path(__file__).parent / "evaluate_metrics"


def check_unit_images(images: torch.Tensor, name: str = "images"):
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.numel() == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a non-empty tensor [B, 3, H, W] in [0, 1], got {shape}.")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got {images.dtype}.")
    low, high = images.min().item(), images.max().item()
    if not (0 <= low and high <= 1):  # also False for NaN
        raise ValueError(
            f"{name} must be in [0, 1], got values in [{low:.3g}, {high:.3g}] (map [-1, 1] images with (x + 1) / 2)."
        )


def check_image_count(count: int, frechet: bool = False, name: str = "images"):
    """Raises where there are no images, or fewer than the 2 that the Frechet distance (a covariance) needs."""
    if count == 0:
        raise ValueError(f"No {name} to evaluate.")
    if frechet and count < 2:
        raise ValueError(f"The Frechet distance needs at least 2 {name}, got {count}.")


def weights_device(*extractors: nn.Module | None) -> torch.device | None:
    """The device of the first extractor that has weights; None if none has."""
    weights = (w for e in extractors if e is not None for w in itertools.chain(e.parameters(), e.buffers()))
    return next((w.device for w in weights), None)


def as_metric_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`images` on the metrics' device, at least float32 (summed squared errors overflow float16) and contiguous
    (torchmetrics' MAE/MSE `view` their inputs)."""
    return images.to(device, torch.promote_types(images.dtype, torch.float32)).contiguous()


def pil_to_tensor(images: list[PIL.Image.Image]) -> torch.Tensor:
    """PIL images of one size -> `[N, 3, H, W]` float32 in [0, 1]."""
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"All images must have the same size, got {sorted(sizes)}.")
    pixels = VaeImageProcessor.pil_to_numpy([image.convert("RGB") for image in images])
    return VaeImageProcessor.numpy_to_pt(pixels).contiguous()


def pil_batches(images: list[PIL.Image.Image], batch_size: int = 64) -> Iterable[torch.Tensor]:
    """Batches `[b, 3, H, W]` in [0, 1] of a list of PIL images (what `evaluate` hands a module for `Image()`)."""
    return (pil_to_tensor(images[start : start + batch_size]) for start in range(0, len(images), batch_size))


def as_batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    return images.split(batch_size) if isinstance(images, torch.Tensor) else images


def perceptual_distance(preds: torch.Tensor, target: torch.Tensor, feature_extractor: nn.Module) -> torch.Tensor:
    """Per-image `1 - cos(f(preds), f(target))` `[B]` between feature embeddings (DreamSim's distance)."""
    check_unit_images(preds, "preds")
    check_unit_images(target, "target")
    return 1 - F.cosine_similarity(feature_extractor(preds).float(), feature_extractor(target).float(), dim=-1)


class PerceptualDistance(Metric):
    """Mean [`perceptual_distance`] over all images seen, with a pluggable extractor (e.g. an
    [`~flextok_hf.evaluation.ImageFeatureExtractor`] over DINOv2 or CLIP)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, feature_extractor: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.feature_extractor = feature_extractor
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor):
        distances = perceptual_distance(preds, target, self.feature_extractor)
        self.total += distances.double().sum()
        self.count += len(distances)

    def compute(self) -> torch.Tensor:
        check_image_count(int(self.count))
        return self.total / self.count


class ImageTextScore(Metric):
    """CLIPScore (Hessel et al. 2021) with any image and text extractors whose embeddings share one space: the mean
    over pairs of `100 * max(cos(image embedding, text embedding), 0)` (torchmetrics' scale)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, image_extractor: nn.Module, text_extractor: Callable[[list[str]], torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self.image_extractor = image_extractor
        self.text_extractor = text_extractor
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, texts: list[str]):
        check_unit_images(images)
        if len(texts) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(texts)} texts.")
        image_embeds, text_embeds = self.image_extractor(images).float(), self.text_extractor(texts).float()
        if image_embeds.shape[-1] != text_embeds.shape[-1]:
            raise ValueError(
                f"Image embeddings have {image_embeds.shape[-1]} dimensions, text embeddings {text_embeds.shape[-1]}: "
                "the two extractors must embed into one space."
            )
        scores = 100 * F.cosine_similarity(image_embeds, text_embeds.to(image_embeds.device), dim=-1).clamp(min=0)
        self.total += scores.double().sum()
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        check_image_count(int(self.count))
        return self.total / self.count


class PairedFrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID with `update(preds, target)`, so that it fits a `MetricCollection` of reconstruction
    metrics: the targets are the real set, the predictions (reconstructions) the other (rFID)."""

    def __init__(self, feature_extractor: nn.Module, **kwargs):
        # normalize=True: images stay floats in [0, 1] (also for torchmetrics' probe of the feature size).
        super().__init__(feature=feature_extractor, normalize=True, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor):
        super().update(target, real=True)
        super().update(preds, real=False)


def build_metrics(
    metrics: Iterable[str] | None = None,
    feature_extractor: nn.Module | None = None,
    perceptual_extractor: nn.Module | None = None,
) -> MetricCollection:
    """A torchmetrics `MetricCollection` of reconstruction metrics; `update(preds, target)` takes images
    `[B, 3, H, W]` in [0, 1].

    Args:
        metrics: names among "mae", "mse", "psnr" (dB, per image then averaged), "ssim", "fid" (rFID, needs
            `feature_extractor`) and "perceptual" (needs `perceptual_extractor`). Default: the pixel metrics, plus
            "fid" and "perceptual" when their extractor is given.
        feature_extractor (`nn.Module`): images -> features `[B, D]` for the Frechet distance, e.g. an
            [`~flextok_hf.evaluation.InceptionFeatureExtractor`].
        perceptual_extractor (`nn.Module`): images -> embeddings `[B, D]` for the perceptual distance.
    """
    if metrics is None:
        metrics = list(PIXEL_METRICS) + ["fid"] * (feature_extractor is not None)
        metrics += ["perceptual"] * (perceptual_extractor is not None)
    builders = {
        "mae": MeanAbsoluteError,
        "mse": MeanSquaredError,
        "psnr": lambda: PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
        "ssim": lambda: StructuralSimilarityIndexMeasure(data_range=1.0),
        "fid": lambda: PairedFrechetDistance(feature_extractor),
        "perceptual": lambda: PerceptualDistance(perceptual_extractor),
    }
    metrics = list(metrics)
    unknown = [name for name in metrics if name not in builders]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty list among {list(builders)}, got {metrics}.")
    if "fid" in metrics and feature_extractor is None:
        raise ValueError("The 'fid' metric needs a feature_extractor (images -> features).")
    if "perceptual" in metrics and perceptual_extractor is None:
        raise ValueError("The 'perceptual' metric needs a perceptual_extractor (images -> embeddings).")
    return MetricCollection({name: builders[name]() for name in metrics})


@torch.no_grad()
def compute_metrics(
    predictions: torch.Tensor | Iterable[torch.Tensor],
    references: torch.Tensor | Iterable[torch.Tensor],
    metrics: Iterable[str] | None = None,
    feature_extractor: nn.Module | None = None,
    perceptual_extractor: nn.Module | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Reconstruction metrics of `predictions` against `references`: tensors `[N, 3, H, W]` in [0, 1], or iterables
    of matching batches.

    Returns `{name: value}` for the metrics of [`build_metrics`] (same arguments). They run on the extractors'
    device, else on the images'.
    """
    collection = build_metrics(metrics, feature_extractor, perceptual_extractor)
    device = weights_device(feature_extractor, perceptual_extractor)
    count = 0
    batches = zip(as_batches(predictions, batch_size), as_batches(references, batch_size), strict=True)
    for preds, target in batches:
        check_unit_images(preds, "predictions")
        check_unit_images(target, "references")
        if preds.shape != target.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and references {tuple(target.shape)} differ in shape.")
        device = device or preds.device
        collection.to(device)  # torchmetrics' states stay where they were built; a no-op after the first batch
        collection.update(as_metric_input(preds, device), as_metric_input(target, device))
        count += len(preds)
    check_image_count(count, frechet="fid" in collection)
    return {name: value.item() for name, value in collection.compute().items()}


@torch.no_grad()
def frechet_distance(
    real_images: torch.Tensor | Iterable[torch.Tensor],
    generated_images: torch.Tensor | Iterable[torch.Tensor],
    feature_extractor: nn.Module,
    batch_size: int = 64,
) -> float:
    """Frechet distance between the features of two image sets (gFID with Inception features), each a tensor
    `[N, 3, H, W]` in [0, 1] or an iterable of such batches; the sets may differ in size. It runs on the
    extractor's device, else on the images'."""
    fid = FrechetInceptionDistance(feature=feature_extractor, normalize=True)
    device = weights_device(feature_extractor)
    for images, name in ((real_images, "real_images"), (generated_images, "generated_images")):
        count = 0
        for batch in as_batches(images, batch_size):
            check_unit_images(batch, name)
            device = device or batch.device
            fid.to(device)  # a no-op after the first batch
            fid.update(as_metric_input(batch, device), real=name == "real_images")
            count += len(batch)
        check_image_count(count, frechet=True, name=name)
    return fid.compute().item()


@torch.no_grad()
def clip_score(
    images: torch.Tensor | Iterable[torch.Tensor],
    texts: list[str],
    image_extractor: nn.Module,
    text_extractor: Callable[[list[str]], torch.Tensor],
    batch_size: int = 64,
) -> float:
    """[`ImageTextScore`] of images (a tensor `[N, 3, H, W]` in [0, 1] or an iterable of batches) and their N
    captions, in order. It runs on the image extractor's device, else on the images'."""
    score = ImageTextScore(image_extractor, text_extractor)
    device = weights_device(image_extractor)
    seen = 0
    for batch in as_batches(images, batch_size):
        check_unit_images(batch)
        device = device or batch.device
        score.to(device)  # a no-op after the first batch
        score.update(as_metric_input(batch, device), texts[seen : seen + len(batch)])
        seen += len(batch)
    if seen != len(texts):
        raise ValueError(f"Got {seen} images but {len(texts)} texts.")
    return score.compute().item()


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of one of this package's metric modules, offline: "image_reconstruction",
    "frechet_distance" or "clip_score"."""
    path = EVALUATE_MODULES / f"{name}.py"
    if not path.is_file():
        available = sorted(p.stem for p in EVALUATE_MODULES.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"No metric module {name!r}; available: {available}.")
    return evaluate.load(str(path), **kwargs)
