"""CLIP score as an `evaluate` module, with pluggable image and text extractors. A wrapper over
`flextok_hf.evaluation.clip_score`."""

import datasets
import evaluate

from flextok_hf.evaluation.metrics import clip_score, pil_batches

_DESCRIPTION = """How well images match their captions: the mean of 100 * max(cos(image embedding, text embedding), 0)
(CLIPScore, Hessel et al. 2021). Any image and text extractors that embed into one space work: both towers of a CLIP
model, or a vision model projected into a sentence encoder's space."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of PIL images or uint8 arrays [H, W, 3]): the images.
    references (list of str): their captions.
    image_extractor (torch.nn.Module): images [B, 3, H, W] in [0, 1] -> embeddings [B, D].
    text_extractor (callable): list of B texts -> embeddings [B, D].
    batch_size (int, optional): images per batch, default 64.
Returns:
    dict with "clip_score" (float, 0 to 100).
Examples:
    >>> metric = flextok_hf.evaluation.load_metric("clip_score")
    >>> metric.compute(predictions=images, references=captions, image_extractor=..., text_extractor=...)
    {'clip_score': ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClipScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, image_extractor=None, text_extractor=None, batch_size=64):
        if image_extractor is None or text_extractor is None:
            raise ValueError("Pass image_extractor and text_extractor to compute.")
        score = clip_score(pil_batches(predictions, batch_size), references, image_extractor, text_extractor)
        return {"clip_score": score}
