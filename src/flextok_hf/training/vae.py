"""The VAE that the tokenizer trains on: a diffusers `AutoencoderKL`, trained from scratch or fine-tuned."""

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..configuration_flextok import DEFAULT_VAE_CONFIG
from .config import TrainingConfig, check_model_settings
from .losses import FrozenVisionFeatures, vae_loss


@dataclass
class VAETrainingConfig(TrainingConfig):
    """Train or fine-tune a diffusers `AutoencoderKL` (L1 + MSE + KL, optional perceptual loss).

    `model` holds `AutoencoderKL` config overrides on top of FlexTok's released VAE shape (16 latent channels,
    factor 8); `pretrained_model_name_or_path` fine-tunes an existing VAE instead. `perceptual_model_name_or_path`
    names a transformers vision encoder whose features the perceptual loss compares.
    """

    model: dict[str, Any] = field(default_factory=dict)
    pretrained_model_name_or_path: str | None = None
    kl_weight: float = 1e-6
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    perceptual_model_name_or_path: str | None = None
    perceptual_weight: float = 0.1
    use_ema: bool = False


class VAETrainingModel(nn.Module):
    """The VAE with its loss as `forward`, so that accelerate's DDP/FSDP wrapper sees every trained call. The frozen
    perceptual encoder is passed in, not held: it is then neither checkpointed, sharded nor put in train mode."""

    def __init__(self, vae: AutoencoderKL, config: VAETrainingConfig):
        super().__init__()
        self.vae = vae
        self.loss_weights = dict(
            kl_weight=config.kl_weight,
            l1_weight=config.l1_weight,
            mse_weight=config.mse_weight,
            perceptual_weight=config.perceptual_weight,
        )

    def forward(
        self, images: torch.Tensor, perceptual: FrozenVisionFeatures | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return vae_loss(self.vae, images, perceptual=perceptual, **self.loss_weights)


def build_vae(config: VAETrainingConfig) -> tuple[VAETrainingModel, FrozenVisionFeatures | None]:
    """The VAE to train, and the frozen encoder of the perceptual loss, if any."""
    if config.pretrained_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(config.pretrained_model_name_or_path)
    else:
        check_model_settings(config.model, set(inspect.signature(AutoencoderKL).parameters), "AutoencoderKL")
        settings = {k: v for k, v in DEFAULT_VAE_CONFIG.items() if not k.startswith("_")}
        vae = AutoencoderKL.from_config({**settings, **config.model})
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    perceptual = None
    if config.perceptual_model_name_or_path:
        perceptual = FrozenVisionFeatures.from_pretrained(config.perceptual_model_name_or_path)
    return VAETrainingModel(vae, config).train(), perceptual


def vae_loss_function(perceptual: FrozenVisionFeatures | None, device: torch.device):
    """`(model, batch) -> (loss, logs)` for [`~flextok_hf.training.train`]; the perceptual encoder moves to
    `device` and runs inside the model's forward (in its mixed precision)."""
    perceptual = perceptual.to(device) if perceptual is not None else None

    def compute_loss(model, batch):
        return model(batch["pixel_values"].to(device, non_blocking=True), perceptual)

    return compute_loss


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """`1 / std` of the posterior means of `images`: the factor that gives the tokenizer unit-variance latents
    (diffusers' `scaling_factor`)."""
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
    return 1.0 / latents.float().std().item()
