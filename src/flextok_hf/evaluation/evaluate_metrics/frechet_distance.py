"""Frechet distance (FID) as an `evaluate` module, over the features of a pluggable extractor. A wrapper over
`flextok_hf.evaluation.frechet_distance`; for sets of different sizes call that function directly."""

import datasets
import evaluate

from flextok_hf.evaluation.metrics import frechet_distance, pil_batches

_DESCRIPTION = """The Frechet distance between Gaussians fitted to the features of two image sets (torchmetrics): gFID
with generated images and a real reference set, rFID with reconstructions and their originals. FID proper uses the
Inception-v3 features of `flextok_hf.evaluation.InceptionFeatureExtractor` (a local TorchScript file)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of PIL images or uint8 arrays [H, W, 3]): generated (or reconstructed) images.
    references (list of PIL images or uint8 arrays [H, W, 3]): real images.
    feature_extractor (torch.nn.Module): images [B, 3, H, W] in [0, 1] -> features [B, D].
    batch_size (int, optional): images per batch, default 64.
Returns:
    dict with "frechet_distance" (float).
Examples:
    >>> metric = flextok_hf.evaluation.load_metric("frechet_distance")
    >>> metric.compute(predictions=generated, references=real, feature_extractor=InceptionFeatureExtractor(path))
    {'frechet_distance': ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FrechetDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references, feature_extractor=None, batch_size=64):
        if feature_extractor is None:
            raise ValueError("Pass feature_extractor (images [B, 3, H, W] in [0, 1] -> features) to compute.")
        real, generated = pil_batches(references, batch_size), pil_batches(predictions, batch_size)
        return {"frechet_distance": frechet_distance(real, generated, feature_extractor)}
