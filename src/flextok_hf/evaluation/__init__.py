"""Evaluating FlexTok: image metrics, reconstruction quality per token budget and decoding cost, adaptive budgets."""

from .features import (
    ImageFeatureExtractor,
    InceptionFeatureExtractor,
    TextFeatureExtractor,
    load_image_feature_extractor,
)
from .metrics import (
    ImageTextScore,
    PerceptualDistance,
    build_metrics,
    clip_score,
    compute_metrics,
    frechet_distance,
    load_metric,
    perceptual_distance,
)

__all__ = [
    "ImageFeatureExtractor",
    "ImageTextScore",
    "InceptionFeatureExtractor",
    "PerceptualDistance",
    "TextFeatureExtractor",
    "build_metrics",
    "clip_score",
    "compute_metrics",
    "frechet_distance",
    "load_image_feature_extractor",
    "load_metric",
    "perceptual_distance",
]
