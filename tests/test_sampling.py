"""Tests of the samplers in flextok_hf.sampling, on small tensors."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from tiny_models import random_flextok_model

from flextok_hf.sampling import (
    FlowGuidance,
    TokenSampler,
    draw_uniforms,
    flow_sigmas,
    sample_from_probs,
    set_flow_timesteps,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def velocities(seed: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    conditional, unconditional = torch.randn(2, batch, 4, 5, 5, generator=seeded(seed))
    return conditional, unconditional


# ------------------------------------------------------------------------------------------ rectified flow


def test_flow_sigmas_are_i_over_t():
    assert flow_sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    assert flow_sigmas(1) == [1.0]


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_flow_sigmas_reject_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_sigmas(steps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_set_flow_timesteps_puts_flextok_grid_on_euler_and_heun(shift):
    euler, heun = FlowMatchEulerDiscreteScheduler(shift=shift), FlowMatchHeunDiscreteScheduler(shift=shift)
    heun_sigma_min = heun.sigma_min
    set_flow_timesteps(euler, 4)
    set_flow_timesteps(heun, 4)
    shifted = torch.tensor([shift * s / (1 + (shift - 1) * s) for s in [1.0, 0.75, 0.5, 0.25]] + [0.0])
    torch.testing.assert_close(euler.sigmas, shifted)
    torch.testing.assert_close(euler.timesteps, 1000 * shifted[:-1])
    # Heun: each inner level twice (the end of one step, the start of the next), one time step per model evaluation.
    heun_layout = torch.cat([shifted[:1], shifted[1:-1].repeat_interleave(2), shifted[-1:]])
    torch.testing.assert_close(heun.sigmas, heun_layout)
    torch.testing.assert_close(heun.timesteps, 1000 * heun_layout[:-1])
    assert heun.sigma_min == heun_sigma_min  # the scheduler's own default spacing is left as it was
    set_flow_timesteps(heun, 1)
    assert heun.sigmas.tolist() == [1.0, 0.0]


def test_set_flow_timesteps_rejects_other_schedulers_and_bad_step_counts():
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler"):
        set_flow_timesteps(DDIMScheduler(), 4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        set_flow_timesteps(FlowMatchHeunDiscreteScheduler(), 0)


def test_cfg_guidance():
    conditional, unconditional = velocities(0)
    guided = FlowGuidance(scale=3.0, method="cfg")(conditional, unconditional)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))
    assert FlowGuidance(method="cfg").new_momentum_buffer() is None


def released_apg(steps: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> list[torch.Tensor]:
    """The released sampler's APG as SPEC.md section 3 states it, per image, in float64."""
    average, guided = 0, []
    for conditional, unconditional in steps:
        average = (conditional - unconditional).double() + -0.5 * average
        norm = average.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        update = average * torch.clamp(2.5 / norm, max=1.0)
        direction = conditional.double() / conditional.double().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        parallel = (update * direction).flatten(1).sum(dim=1).view(-1, 1, 1, 1) * direction
        guided.append(conditional.double() + (scale - 1) * (update - parallel))
    return guided


def test_apg_defaults_are_the_released_sampler():
    guidance = FlowGuidance(scale=7.5)
    assert guidance.method == "apg"
    # Large differences, so that the norm threshold acts; three steps, so that the momentum does.
    steps = [(c, u * 4) for c, u in (velocities(seed) for seed in range(3))]
    momentum_buffer = guidance.new_momentum_buffer()
    for (conditional, unconditional), expected in zip(steps, released_apg(steps, 7.5), strict=True):
        guided = guidance(conditional, unconditional, momentum_buffer)
        torch.testing.assert_close(guided.double(), expected, rtol=1e-5, atol=1e-5)


def test_apg_without_momentum_threshold_or_projection_is_cfg():
    conditional, unconditional = velocities(1)
    apg = FlowGuidance(scale=4.0, momentum=0.0, norm_threshold=0.0, eta=1.0)
    cfg = FlowGuidance(scale=4.0, method="cfg")
    guided = apg(conditional, unconditional, apg.new_momentum_buffer())
    torch.testing.assert_close(guided, cfg(conditional, unconditional))


def test_apg_momentum_buffers_are_fresh_per_run():
    guidance = FlowGuidance(scale=5.0)
    conditional, unconditional = velocities(2)
    first = guidance(conditional, unconditional, guidance.new_momentum_buffer())
    again = guidance(conditional, unconditional, guidance.new_momentum_buffer())
    assert torch.equal(first, again)
    carried = guidance.new_momentum_buffer()
    guidance(*velocities(3), carried)
    assert not torch.allclose(guidance(conditional, unconditional, carried), first)


def test_scale_one_turns_guidance_off():
    assert not FlowGuidance(scale=1.0).is_enabled and FlowGuidance(scale=0.0).is_enabled
    assert not TokenSampler().is_guided and TokenSampler(guidance_scale=2).is_guided


@pytest.mark.parametrize("scale", [-1.0, -1e-6, math.nan, math.inf, True, "7.5", None])
def test_guidance_scales_must_be_finite_and_non_negative(scale):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        FlowGuidance(scale=scale)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        TokenSampler(guidance_scale=scale)


def test_numpy_scales_are_numbers():
    assert FlowGuidance(scale=np.float32(2.0)).is_enabled


def test_unknown_guidance_method():
    with pytest.raises(ValueError, match="'apg' or 'cfg'"):
        FlowGuidance(method="pag")


@pytest.mark.parametrize("method", ["apg", "cfg"])
def test_documented_decoder_loop_is_decode(method):
    """docs/generation.md's sampling loop, on a tiny model and 16x16 images: it is `decode`, and like `decode` keeps
    no autograd graph (which would hold every step's activations)."""
    docs = (Path(__file__).parents[1] / "docs" / "generation.md").read_text()
    (loop,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "set_flow_timesteps(" in block]
    loop = loop.replace("FlowGuidance(scale=5.0, momentum=-0.3)", f"FlowGuidance(7.5, {method!r})")
    loop = loop.replace("256, 256", "16, 16").replace(
        "set_flow_timesteps(scheduler, 25)", "set_flow_timesteps(scheduler, 3)"
    )
    flextok, token_ids = random_flextok_model(), torch.randint(0, 1000, (2, 4), generator=seeded(0))
    namespace = {"flextok": flextok, "token_ids": token_ids, "generator": seeded(1)}
    exec(loop, namespace)
    images = namespace["images"]
    expected = flextok.decode(
        token_ids, num_inference_steps=3, guidance_scale=7.5, norm_guidance=method == "apg", generator=seeded(1)
    ).images
    assert not images.requires_grad
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- tokens


def test_token_sampler_guides_then_takes_the_argmax():
    conditional, unconditional = torch.randn(2, 3, 50, generator=seeded(0))
    sampler = TokenSampler(guidance_scale=3.0, do_sample=False)
    tokens = sampler(torch.cat([conditional, unconditional]))
    expected = (unconditional + 3.0 * (conditional - unconditional)).argmax(dim=-1, keepdim=True)
    assert tokens.shape == (3, 1) and torch.equal(tokens, expected)


def test_token_sampler_top_k_one_is_greedy():
    logits = torch.randn(4, 50, generator=seeded(1))
    sampled = TokenSampler(top_k=1, temperature=2.0)(logits, seeded(0))
    assert torch.equal(sampled, logits.argmax(dim=-1, keepdim=True))


def test_token_sampler_warpers_restrict_the_draws():
    logits = torch.randn(1, 50, generator=seeded(2)).expand(300, -1)
    allowed = set(logits[0].topk(5).indices.tolist())
    sampled = TokenSampler(top_k=5, temperature=3.0)(logits, seeded(0))
    assert set(sampled.flatten().tolist()) == allowed  # 300 draws at a high temperature reach all five


def test_token_sampler_rows_follow_their_own_generators():
    logits = torch.randn(3, 50, generator=seeded(3))
    sampler = TokenSampler(temperature=2.0)
    batch = sampler(logits, [seeded(seed) for seed in (7, 8, 9)])
    for row, seed in enumerate((7, 8, 9)):
        assert torch.equal(batch[row], sampler(logits[row : row + 1], seeded(seed))[0])


def test_token_sampler_takes_an_integer_temperature():
    logits = torch.randn(2, 10, generator=seeded(3))
    assert torch.equal(TokenSampler(temperature=2)(logits, seeded(0)), TokenSampler(temperature=2.0)(logits, seeded(0)))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=0.0), "temperature must be a number > 0"),
        (dict(temperature="1"), "temperature must be a number > 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=5.0), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
        (dict(top_p="0.5"), r"top_p must lie in \(0, 1\]"),
        (dict(top_p=True), r"top_p must lie in \(0, 1\]"),
    ],
)
def test_token_sampler_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        TokenSampler(**settings)
    TokenSampler(do_sample=False, **settings)  # unused without sampling


def test_draw_uniforms_per_row_generators():
    draws = draw_uniforms(2, [seeded(0), seeded(1)], torch.device("cpu"))
    assert draws.dtype == torch.float64 and draws.shape == (1, 2)
    assert draws[0].tolist() == [torch.rand(1, generator=seeded(s), dtype=torch.float64).item() for s in (0, 1)]
    assert torch.equal(draws, draw_uniforms(2, [seeded(0), seeded(1)], torch.device("cpu")))


@pytest.mark.parametrize("per_row", [False, True])
def test_draws_for_several_steps_at_once_are_the_draws_step_by_step(per_row):
    def generator():
        return [seeded(0), seeded(1), seeded(2)] if per_row else seeded(0)

    one_by_one, step_by_step = generator(), []
    for _ in range(4):
        step_by_step.append(draw_uniforms(3, one_by_one, torch.device("cpu"))[0])
    assert torch.equal(draw_uniforms(3, generator(), torch.device("cpu"), num_steps=4), torch.stack(step_by_step))


def test_sample_from_probs():
    probs = torch.tensor([[0.2, 0.0, 0.8, 0.0], [0.0, 3.0, 0.0, 1.0]])  # rows need not be normalised
    uniforms = torch.rand(4000, 2, dtype=torch.float64, generator=seeded(0))
    draws = torch.cat([sample_from_probs(probs, row) for row in uniforms], dim=1)
    assert abs((draws[0] == 2).double().mean().item() - 0.8) < 0.03
    assert abs((draws[1] == 1).double().mean().item() - 0.75) < 0.03
    assert set(draws[0].tolist()) == {0, 2} and set(draws[1].tolist()) == {1, 3}
    # A target rounded up to the row's total still lands on a token of nonzero probability.
    assert sample_from_probs(probs, torch.ones(2, dtype=torch.float64)).tolist() == [[2], [3]]
    assert sample_from_probs(probs, torch.zeros(2, dtype=torch.float64)).tolist() == [[0], [1]]
