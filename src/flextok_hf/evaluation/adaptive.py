"""Adaptive token budgets: per image, the fewest tokens whose reconstruction meets a quality target.

FlexTok's tokens are ordered coarse to fine, so reconstruction quality grows with the prefix length. Each image's
length is found by a binary search over candidate lengths (powers of two by default), then, if asked, over the
integers between the last candidate that missed and the first that met the target. All images that are still
searching decode their next prefix together, in one batched `decode` call per round, and every decode of an image
starts from the same noise, so an image's reconstruction depends only on its prefix length.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torchmetrics.functional.image import peak_signal_noise_ratio
from transformers.utils import ModelOutput

from ..modeling_flextok import FlexTokModel
from ..utils import is_int, is_number
from .rate_distortion import power_of_two_budgets, to_unit_range

# Built-in targets and whether a reconstruction meets them from below (an error) or from above (a quality).
HIGHER_IS_BETTER = {"latent_mse": False, "psnr": True}


@dataclass
class AdaptiveTokenizationOutput(ModelOutput):
    """
    Args:
        token_ids (`list[torch.LongTensor]`): per image, its first `lengths[i]` token ids (1D).
        lengths (`torch.LongTensor` of shape `(batch_size,)`): tokens chosen per image.
        scores (`torch.FloatTensor` of shape `(batch_size,)`): the metric of each image's reconstruction from its
            chosen tokens.
        met_target (`torch.BoolTensor` of shape `(batch_size,)`): False where no candidate length met the target;
            those images get the largest candidate.
        num_decodes (`torch.LongTensor` of shape `(batch_size,)`): prefixes decoded per image (the search cost).
        num_decode_calls (`int`): batched `decode` calls (search rounds).
    """

    token_ids: list[torch.LongTensor] | None = None
    lengths: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    met_target: torch.BoolTensor | None = None
    num_decodes: torch.LongTensor | None = None
    num_decode_calls: int | None = None


@torch.no_grad()
def adaptive_tokenize(
    model: FlexTokModel,
    images: torch.Tensor,
    target: float,
    metric: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "latent_mse",
    candidates: Sequence[int] | None = None,
    refine: bool = True,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    norm_guidance: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> AdaptiveTokenizationOutput:
    """Tokenize images with, per image, the fewest tokens whose reconstruction meets `target`.

    Args:
        model ([`FlexTokModel`]): the tokenizer.
        images (`torch.FloatTensor` `[B, 3, H, W]` in [-1, 1]): the images.
        target (`float`): the quality to reach, in the unit of `metric`.
        metric: "latent_mse" (MSE between the decoded and the encoded VAE latents, at most `target`; no VAE decode
            needed), "psnr" (dB on [0, 1] pixels, at least `target`), or a callable `(reconstructions, originals)
            -> [n]` distances (at most `target`) on images `[n, 3, H, W]` in [0, 1], e.g. a perceptual distance
            `lambda x, y: perceptual_distance(x, y, extractor)`.
        candidates (`list[int]`): lengths searched first, default 1, 2, 4, ..., `config.num_registers`.
        refine (`bool`): then search the lengths between the last candidate that missed and the first that met.
        num_inference_steps, guidance_scale, norm_guidance: passed to `decode`.
        generator (`torch.Generator`, *optional*): draws each image's noise once; the result is deterministic given
            its seed.

    Returns:
        [`AdaptiveTokenizationOutput`]. The search assumes quality grows with the prefix length, as FlexTok is
        trained to; a chosen length always met the target when its reconstruction was measured.
    """
    num_registers = model.config.num_registers
    candidates = power_of_two_budgets(num_registers) if candidates is None else list(candidates)
    if not candidates or not all(is_int(k) and 1 <= k <= num_registers for k in candidates):
        raise ValueError(f"candidates must be integers in [1, {num_registers}], got {candidates}.")
    candidates = sorted({int(k) for k in candidates})
    if not is_number(target) or not math.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}.")
    target = float(target)
    if isinstance(metric, str) and metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric must be one of {list(HIGHER_IS_BETTER)} or a callable, got {metric!r}.")
    higher_is_better = HIGHER_IS_BETTER.get(metric, False) if isinstance(metric, str) else False

    encoded = model.encode(images, return_dict=True, generator=generator)
    token_ids, encoded_latents = encoded.token_ids, encoded.latents.float()
    originals = to_unit_range(images).to(model.device)
    noise = randn_tensor(encoded_latents.shape, generator=generator, device=model.device, dtype=torch.float32)
    batch = len(images)
    num_decodes = torch.zeros(batch, dtype=torch.long)
    num_decode_calls = 0

    def measure(indices: list[int], lengths: list[int]) -> list[float]:
        """Scores of images `indices` reconstructed from their first `lengths` tokens, in one decode call."""
        nonlocal num_decode_calls
        output = model.decode(
            [token_ids[i, :k] for i, k in zip(indices, lengths, strict=True)],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            norm_guidance=norm_guidance,
            latents=noise[indices],
            height=images.shape[2],
            width=images.shape[3],
            output_type="latent" if metric == "latent_mse" else "pt",
        )
        num_decode_calls += 1
        num_decodes[indices] += 1
        if metric == "latent_mse":
            scores = F.mse_loss(output.latents.float(), encoded_latents[indices], reduction="none").flatten(1).mean(1)
        elif metric == "psnr":
            reconstructions = to_unit_range(output.images)
            scores = peak_signal_noise_ratio(
                reconstructions, originals[indices], data_range=1.0, reduction="none", dim=(1, 2, 3)
            )
        else:
            scores = metric(to_unit_range(output.images), originals[indices])
        return scores.float().cpu().tolist()

    def meets(score: float) -> bool:
        return score >= target if higher_is_better else score <= target

    # Per image: the chosen length and its score. Start from the largest candidate, kept where none meets.
    chosen = [candidates[-1]] * batch
    scores: list[float | None] = [None] * batch
    met = [False] * batch

    def search(options: list[list[int]], low: list[int], high: list[int]):
        """Lower-bound binary search per image over its sorted `options`; `options[i][high[i]]`, where it exists,
        is known to meet the target. Every round decodes the middle option of all unfinished images at once."""
        while active := [i for i in range(batch) if low[i] < high[i]]:
            middles = [(low[i] + high[i]) // 2 for i in active]
            lengths = [options[i][m] for i, m in zip(active, middles, strict=True)]
            for i, m, k, score in zip(active, middles, lengths, measure(active, lengths), strict=True):
                if meets(score):
                    high[i], chosen[i], scores[i], met[i] = m, k, score, True
                else:
                    low[i] = m + 1
                    if k == candidates[-1]:
                        scores[i] = score

    search([candidates] * batch, [0] * batch, [len(candidates)] * batch)
    if refine:
        # Between the candidate below the chosen one (or 0) and the chosen one, which is known to meet the target.
        options = []
        for i in range(batch):
            below = max([k for k in candidates if k < chosen[i]], default=0) if met[i] else chosen[i] - 1
            options.append(list(range(below + 1, chosen[i] + 1)))
        search(options, [0] * batch, [len(o) - 1 for o in options])

    lengths = torch.tensor(chosen)
    return AdaptiveTokenizationOutput(
        token_ids=[token_ids[i, :k] for i, k in enumerate(chosen)],
        lengths=lengths,
        scores=torch.tensor(scores),
        met_target=torch.tensor(met),
        num_decodes=num_decodes,
        num_decode_calls=num_decode_calls,
    )
