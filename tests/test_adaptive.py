"""Adaptive token budgets: the search logic on a model whose quality is known, and the real tiny model."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from test_evaluation import tiny_dinov2_extractor
from tiny_models import random_flextok_model, random_images

from flextok_hf.evaluation import perceptual_distance
from flextok_hf.evaluation.adaptive import adaptive_tokenize

DECODE = dict(num_inference_steps=1, guidance_scale=1.0)


class KnownQualityModel:
    """Stands in for `FlexTokModel` where quality is known: image i's tokens are all i, its encoded latents are 0
    and a k-token prefix decodes to latents `scales[i] / k`, so its latent MSE `(scales[i] / k)^2` falls with k."""

    def __init__(self, scales: list[float], num_registers: int = 16):
        self.config = SimpleNamespace(num_registers=num_registers)
        self.device = torch.device("cpu")
        self.scales = scales
        self.decode_batch_sizes = []

    def encode(self, images, return_dict=True, generator=None):
        token_ids = torch.arange(len(images))[:, None].repeat(1, self.config.num_registers)
        return SimpleNamespace(token_ids=token_ids, latents=torch.zeros(len(images), 1, 2, 2))

    def decode(self, token_ids, latents=None, output_type="pt", **kwargs):
        assert output_type == "latent" and len(latents) == len(token_ids)
        self.decode_batch_sizes.append(len(token_ids))
        values = torch.tensor([self.scales[ids[0]] / len(ids) for ids in token_ids])
        return SimpleNamespace(latents=values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2), images=None)


def fewest_tokens(scale: float, target: float, num_registers: int) -> int | None:
    return next((k for k in range(1, num_registers + 1) if (scale / k) ** 2 <= target), None)


def test_search_finds_the_fewest_tokens_and_looser_targets_never_need_more():
    scales = [0.5, 1.0, 2.0, 3.0, 5.0, 9.0]
    images = torch.zeros(len(scales), 3, 4, 4)
    previous = None
    for target in [0.01, 0.05, 0.1, 0.3, 1.0, 10.0]:  # looser and looser
        model = KnownQualityModel(scales)
        out = adaptive_tokenize(model, images, target=target)
        expected = [fewest_tokens(scale, target, 16) for scale in scales]
        assert out.lengths.tolist() == [16 if k is None else k for k in expected]
        assert out.met_target.tolist() == [k is not None for k in expected]
        lengths = out.lengths.tolist()
        assert out.scores.tolist() == pytest.approx([(s / k) ** 2 for s, k in zip(scales, lengths, strict=True)])
        assert [len(ids) for ids in out.token_ids] == out.lengths.tolist()
        # One batched decode per round, of every image still searching; log2 rounds per search.
        assert model.decode_batch_sizes[0] == len(scales) and out.num_decode_calls == len(model.decode_batch_sizes)
        assert sum(model.decode_batch_sizes) == out.num_decodes.sum()
        assert out.num_decodes.max() <= out.num_decode_calls <= math.ceil(math.log2(6)) + math.ceil(math.log2(8))
        if previous is not None:
            assert (out.lengths <= previous).all()
        previous = out.lengths


def test_search_without_refinement_stops_at_candidates():
    scales = [0.5, 3.0, 9.0]
    out = adaptive_tokenize(KnownQualityModel(scales), torch.zeros(3, 3, 4, 4), target=0.1, refine=False)
    # Fewest tokens 2, 10, 29 (> 16): the first powers of two at or above them, and 16 for the one that never meets.
    assert out.lengths.tolist() == [2, 16, 16] and out.met_target.tolist() == [True, True, False]
    out = adaptive_tokenize(KnownQualityModel(scales), torch.zeros(3, 3, 4, 4), target=0.1, candidates=[3, 12])
    assert out.lengths.tolist() == [2, 10, 12]  # refined below 3 and between 3 and 12; 12 is the largest


def test_adaptive_tokenize_meets_an_achievable_target_on_the_tiny_model():
    model, images = random_flextok_model(), random_images(4)
    num_registers = model.config.num_registers
    full = adaptive_tokenize(
        model,
        images,
        1e30,  # met by any reconstruction
        candidates=[num_registers],
        refine=False,
        generator=torch.Generator().manual_seed(0),
        **DECODE,
    )
    target = full.scores.max().item() * (1 + 1e-4)  # every image meets it with all its tokens
    out = adaptive_tokenize(model, images, target, generator=torch.Generator().manual_seed(0), **DECODE)
    assert out.met_target.all() and (out.scores <= target).all()
    assert ((1 <= out.lengths) & (out.lengths <= num_registers)).all()
    token_ids = model.encode(images)
    for ids, full_ids, k in zip(out.token_ids, token_ids, out.lengths.tolist(), strict=True):
        torch.testing.assert_close(ids, full_ids[:k])

    # The reported scores are those of the chosen prefixes, decoded from the noise the generator gives.
    latents = model.encode(images, return_dict=True).latents
    noise = randn_tensor(latents.shape, generator=torch.Generator().manual_seed(0))
    decoded = model.decode(out.token_ids, latents=noise, output_type="latent", **DECODE).latents
    torch.testing.assert_close(out.scores, F.mse_loss(decoded, latents, reduction="none").flatten(1).mean(1))

    again = adaptive_tokenize(model, images, target, generator=torch.Generator().manual_seed(0), **DECODE)
    assert again.lengths.tolist() == out.lengths.tolist() and again.scores.tolist() == out.scores.tolist()


@pytest.mark.parametrize("metric", ["psnr", "perceptual"])
def test_adaptive_tokenize_with_pixel_and_perceptual_targets(metric):
    model, images = random_flextok_model(), random_images(2)
    if metric == "perceptual":
        extractor = tiny_dinov2_extractor()
        metric = lambda reconstructions, originals: perceptual_distance(reconstructions, originals, extractor)  # noqa: E731
    num_registers = model.config.num_registers
    full = adaptive_tokenize(
        model,
        images,
        0.0,
        metric,
        candidates=[num_registers],
        refine=False,
        generator=torch.Generator().manual_seed(1),
        **DECODE,
    )
    higher_is_better = metric == "psnr"
    target = full.scores.min().item() - 1e-3 if higher_is_better else full.scores.max().item() + 1e-5
    out = adaptive_tokenize(model, images, target, metric, generator=torch.Generator().manual_seed(1), **DECODE)
    assert out.met_target.all()
    assert (out.scores >= target).all() if higher_is_better else (out.scores <= target).all()
    assert ((1 <= out.lengths) & (out.lengths <= num_registers)).all()


def test_adaptive_tokenize_refuses_bad_arguments():
    model, images = KnownQualityModel([1.0]), torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="metric"):
        adaptive_tokenize(model, images, 0.1, metric="lpips")
    with pytest.raises(ValueError, match="candidates"):
        adaptive_tokenize(model, images, 0.1, candidates=[0, 4])
    with pytest.raises(ValueError, match="candidates"):
        adaptive_tokenize(model, images, 0.1, candidates=[32])
    with pytest.raises(ValueError, match="candidates"):
        adaptive_tokenize(model, images, 0.1, candidates=[])
    for target in (float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="target"):
            adaptive_tokenize(model, images, target)


def test_adaptive_tokenize_takes_numpy_numbers():
    model, images = KnownQualityModel([0.5, 3.0]), torch.zeros(2, 3, 4, 4)
    out = adaptive_tokenize(model, images, np.float32(0.1), candidates=np.array([2, 16]))
    assert out.lengths.tolist() == [2, 10]  # the fewest k with (scale / k)^2 <= 0.1


def test_encode_with_a_target_is_adaptive_tokenization():
    model, images = random_flextok_model(), random_images(3)
    options = dict(candidates=[2, 8], num_inference_steps=1, guidance_scale=1.0)
    out = model.encode(images, target=330.0, metric="latent_mse", generator=torch.Generator().manual_seed(4), **options)
    expected = adaptive_tokenize(model, images, 330.0, generator=torch.Generator().manual_seed(4), **options)
    assert type(out) is type(expected) and out.lengths.tolist() == expected.lengths.tolist()
    assert [ids.tolist() for ids in out.token_ids] == [ids.tolist() for ids in expected.token_ids]
    assert out.scores.tolist() == expected.scores.tolist()
    assert torch.equal(model.encode(images), model.encode(images, return_dict=True).token_ids)  # without a target
    with pytest.raises(ValueError, match="only apply to adaptive tokenization"):
        model.encode(images, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\['metric'\] only apply to adaptive tokenization"):
        model.encode(images, metric="psnr")
