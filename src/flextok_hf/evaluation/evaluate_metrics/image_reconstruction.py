"""Reconstruction metrics as an `evaluate` module: MAE, MSE, PSNR and SSIM, and with the extractors passed to
`compute`, rFID and a perceptual distance. A wrapper over `flextok_hf.evaluation.compute_metrics`."""

import datasets
import evaluate

from flextok_hf.evaluation.metrics import compute_metrics, pil_batches

_DESCRIPTION = """How close reconstructed images are to their originals, on pixels in [0, 1]: MAE, MSE, PSNR (dB, per
image then averaged) and SSIM by torchmetrics; rFID (torchmetrics' Frechet distance over the features of
`feature_extractor`) and a perceptual distance (1 - cosine of `perceptual_extractor` embeddings) on request."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of PIL images or uint8 arrays [H, W, 3]): the reconstructions.
    references (list of PIL images or uint8 arrays [H, W, 3]): the originals, in the same order and size.
    metrics (list of str, optional): among "mae", "mse", "psnr", "ssim", "fid", "perceptual"; default the pixel
        metrics plus those whose extractor is given.
    feature_extractor (torch.nn.Module, optional): images [B, 3, H, W] in [0, 1] -> features [B, D], for "fid".
    perceptual_extractor (torch.nn.Module, optional): images [B, 3, H, W] in [0, 1] -> embeddings, for "perceptual".
    batch_size (int, optional): images per batch, default 64.
Returns:
    dict of metric name -> float.
Examples:
    >>> metric = flextok_hf.evaluation.load_metric("image_reconstruction")
    >>> metric.compute(predictions=reconstructions, references=originals)
    {'mae': ..., 'mse': ..., 'psnr': ..., 'ssim': ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ImageReconstruction(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(
        self, predictions, references, metrics=None, feature_extractor=None, perceptual_extractor=None, batch_size=64
    ):
        return compute_metrics(
            pil_batches(predictions, batch_size),
            pil_batches(references, batch_size),
            metrics=metrics,
            feature_extractor=feature_extractor,
            perceptual_extractor=perceptual_extractor,
        )
