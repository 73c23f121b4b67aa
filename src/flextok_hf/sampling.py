"""FlexTok's samplers, shared by `FlexTokModel.decode`, `FlexTokARModel.generate_tokens`, `FlexTokPipeline`,
evaluation and training-time previews.

Images from tokens (rectified flow): steps of a diffusers `FlowMatchEulerDiscreteScheduler` (Euler, the released
sampler) or `FlowMatchHeunDiscreteScheduler` (Heun, second order) over the noise levels `flow_sigmas(T)` = i/T for
i = T..1, set by `set_flow_timesteps`, each on the decoder's velocity guided by a `FlowGuidance`.

Tokens from the AR model: a `TokenSampler` turns next-token logits into token ids (classifier-free guidance on the
logits, transformers' temperature / top-k / top-p warpers, then inverse-CDF sampling driven by a `torch.Generator` or
by one generator per row).
"""

import inspect
import math
import numbers
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

if TYPE_CHECKING:
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer


def check_guidance_scale(scale: float, name: str = "guidance_scale") -> None:
    """Raises `ValueError` unless `scale` is a finite number >= 0 (with plain CFG, 0 gives the unconditional
    prediction)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1.0 turns guidance off), got {scale!r}.")


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """`u + s * (c - u)`: the conditional prediction at s = 1, the unconditional one at s = 0."""
    return unconditional + scale * (conditional - unconditional)


# ------------------------------------------------------------------------------------------ rectified flow


def flow_sigmas(num_inference_steps: int) -> list[float]:
    """FlexTok's grid, the noise levels i/T for i = T..1, for `scheduler.set_timesteps(sigmas=...)` (the scheduler
    appends the final 0, and its own shift, if any, applies on top); `set_flow_timesteps` sets it on any scheduler."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int of at least 1, got {num_inference_steps!r}.")
    return [i / num_inference_steps for i in range(num_inference_steps, 0, -1)]


def set_flow_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler,
    num_inference_steps: int,
    device: torch.device | str | None = None,
) -> None:
    """Sets FlexTok's grid `flow_sigmas(num_inference_steps)`, shifted by the scheduler's own `shift`, on a diffusers
    flow-matching scheduler. The sampling loop then evaluates the model once per entry of `scheduler.timesteps`, at
    the noise level of the same index in `scheduler.sigmas`: T times for Euler, 2T - 1 times for Heun (two
    evaluations per step, except the last step to sigma 0, which is an Euler step)."""
    sigmas = flow_sigmas(num_inference_steps)
    if isinstance(scheduler, FlowMatchHeunDiscreteScheduler):
        # Heun's set_timesteps takes no sigmas: it spaces them evenly from sigma_max (1) down to sigma_min, then shifts
        # them, so sigma_min = 1/T gives FlexTok's grid; the scheduler's own sigma_min is put back afterwards.
        own_sigma_min, scheduler.sigma_min = scheduler.sigma_min, sigmas[-1]
        scheduler.set_timesteps(num_inference_steps, device=device)
        scheduler.sigma_min = own_sigma_min
    elif "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        raise ValueError(
            "scheduler must be a FlowMatchEulerDiscreteScheduler, a FlowMatchHeunDiscreteScheduler or another "
            f"flow-matching scheduler whose set_timesteps takes sigmas, got {type(scheduler).__name__}."
        )


@dataclass(frozen=True)
class FlowGuidance:
    """How the rectified-flow decoder is guided toward its tokens, from the conditional velocity `c` and the
    unconditional one `u` (every register replaced by the null condition).

    Args:
        scale (`float`): guidance strength s, finite and >= 0; 1.0 turns guidance off and skips the unconditional pass.
        method (`str`): "apg", adaptive projected guidance (arXiv 2410.02416), as the released sampler; or "cfg",
            classifier-free guidance `u + s * (c - u)`.
        momentum, norm_threshold, eta (`float`): APG's settings. The defaults are the released sampler's: the update
            `c - u` is averaged over the steps with momentum -0.5, its L2 norm over (C, H, W) is clipped to 2.5, and its
            part parallel to `c` is kept with weight eta = 0, giving `c + (s - 1) * (orthogonal part)`.

    diffusers' `AdaptiveProjectedGuidance` guider computes the same with scale s - 1, but it is experimental (it
    warns when built) and keeps the step state of modular pipelines, which run the two branches as separate batches;
    its `normalized_guidance` and `MomentumBuffer` are used directly instead.
    """

    scale: float = 7.5
    method: Literal["apg", "cfg"] = "apg"
    momentum: float = -0.5
    norm_threshold: float = 2.5
    eta: float = 0.0

    def __post_init__(self):
        check_guidance_scale(self.scale)
        if self.method not in ("apg", "cfg"):
            raise ValueError(f"method must be 'apg' or 'cfg', got {self.method!r}.")

    @property
    def is_enabled(self) -> bool:
        """Whether the unconditional velocity is needed at all."""
        return self.scale != 1.0

    def new_momentum_buffer(self) -> "MomentumBuffer | None":
        """APG's running average of `c - u`, fresh for each sampling run (`None` for CFG)."""
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

        return MomentumBuffer(self.momentum) if self.method == "apg" else None

    def __call__(
        self, conditional: torch.Tensor, unconditional: torch.Tensor, momentum_buffer: "MomentumBuffer | None" = None
    ) -> torch.Tensor:
        """Guided velocity `[B, C, H, W]` from `c` and `u` of that shape; APG updates `momentum_buffer`."""
        # Imported here, not with the module: diffusers' guiders import peft when it is installed, peft imports
        # transformers' Auto classes, and those import our modeling modules, which import this one.
        from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

        if self.method == "cfg":
            return classifier_free_guidance(conditional, unconditional, self.scale)
        return normalized_guidance(
            conditional,
            unconditional,
            self.scale - 1,
            momentum_buffer,
            eta=self.eta,
            norm_threshold=self.norm_threshold,
            use_original_formulation=True,
            norm_dim=(1, 2, 3),
        )


# ------------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenSampler:
    """Picks the next image token of each row from an AR model's logits.

    Args:
        guidance_scale (`float`): classifier-free guidance `u + s * (c - u)` of the logits, finite and >= 0; at 1.0
            there is none. With guidance the logits come as one batch of 2B rows, the conditional half first.
        do_sample (`bool`): sample from the processed distribution; `False` takes the argmax (the settings below
            and the generator are then unused).
        temperature (`float`): divides the guided logits; > 0.
        top_k (`int`, *optional*): keep the k most likely tokens; >= 1.
        top_p (`float`, *optional*): keep the smallest set of tokens whose probability reaches top_p; in (0, 1].
    """

    guidance_scale: float = 1.0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        check_guidance_scale(self.guidance_scale)
        if not self.do_sample:
            return
        temperature, top_k = self.temperature, self.top_k
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}.")
        object.__setattr__(self, "temperature", float(temperature))  # transformers' warper takes floats only
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
        if top_k is not None:
            object.__setattr__(self, "top_k", int(top_k))
        top_p = self.top_p
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}.")

    @property
    def is_guided(self) -> bool:
        """Whether the model must also run the unconditional half."""
        return self.guidance_scale != 1.0

    @cached_property
    def logits_warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k is not None:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def __call__(
        self,
        logits: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.LongTensor:
        """
        Args:
            logits (`torch.Tensor` `[B, vocab_size]`, or `[2B, vocab_size]` with guidance): next-token logits.
            generator (`torch.Generator` or a list of B, *optional*): see `draw_uniforms`.

        Returns:
            `torch.LongTensor` `[B, 1]`: the next tokens.
        """
        batch_size = len(logits) // 2 if self.is_guided else len(logits)
        uniforms = draw_uniforms(batch_size, generator, logits.device)[0] if self.do_sample else None
        return self.select(logits, uniforms)

    def select(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.LongTensor:
        """
        The next tokens `[B, 1]` from `logits` (as in `__call__`) and one uniform draw per row `[B]` (None when not
        sampling). No host synchronisation: the work queues behind the model's step without waiting for it.
        """
        logits = logits.float()
        if self.is_guided:
            logits = classifier_free_guidance(*logits.chunk(2), self.guidance_scale)
        if not self.do_sample:
            return logits.argmax(dim=-1, keepdim=True)
        # Temperature, top-k and top-p read only the scores, not the tokens so far.
        probs = F.softmax(self.logits_warpers(None, logits), dim=-1)
        return sample_from_probs(probs, uniforms)


def draw_uniforms(
    batch_size: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    num_steps: int = 1,
) -> torch.Tensor:
    """
    Draws float64 numbers in [0, 1), one per batch row and step, `[num_steps, batch_size]`: all from `generator`
    (step by step, as `num_steps` calls would), or row i from `generator[i]` when it is a list, so that a row depends
    only on its own generator. Draws happen on the generator's device, then move to `device` in one copy (as
    diffusers' `randn_tensor` does), so a CPU generator drives a model on an accelerator without a copy per step.
    """
    if generator is None:
        return torch.rand(num_steps, batch_size, dtype=torch.float64, device=device)
    if isinstance(generator, torch.Generator):
        draws = torch.rand(num_steps, batch_size, generator=generator, dtype=torch.float64, device=generator.device)
        return draws.to(device)
    draws = [torch.rand(num_steps, generator=g, dtype=torch.float64, device=g.device).to(device) for g in generator]
    return torch.stack(draws, dim=1)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
    """
    Inverse-CDF sampling, batched: row i of `probs` `[batch, vocab_size]` (non-negative, not necessarily normalised)
    yields the token whose cumulative-probability interval holds `uniforms[i]` times the row's total; tokens of
    probability 0 are never drawn. Returns `[batch, 1]`.
    """
    cdf = probs.double().cumsum(dim=-1)
    targets = uniforms[:, None].to(cdf) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, targets, right=True)
    # Rounding can put the target on the row's total, past the last token: take the last allowed token instead.
    last_allowed = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(tokens, last_allowed)
