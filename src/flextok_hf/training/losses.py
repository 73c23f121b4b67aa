"""Training losses beyond what the models' own `forward` computes: REPA targets from a frozen vision encoder, and
the VAE's reconstruction loss."""

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import AutoModel, PreTrainedModel

# ImageNet statistics, the normalisation of DINOv2 / most transformers vision encoders.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenVisionFeatures(nn.Module):
    """Patch features of a frozen ViT-style transformers vision encoder (DINOv2, ViT: a CLS token, optional
    registers, then patches), the targets of REPA and of feature-space (perceptual) losses.

    Images `[B, 3, H, W]` in [-1, 1] are resized to the encoder's `image_size`, normalised with `mean`/`std`, and
    mapped to `[B, N, hidden_size]`: the last hidden state without its leading class (and register) tokens.
    """

    def __init__(self, encoder: PreTrainedModel, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        config = encoder.config
        if not hasattr(config, "image_size") or not hasattr(config, "hidden_size"):
            raise ValueError(
                f"{type(encoder).__name__} is not a ViT-style vision encoder (its config has no image_size or "
                "hidden_size): use one such as facebook/dinov2-base."
            )
        self.image_size = config.image_size
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "FrozenVisionFeatures":
        return cls(AutoModel.from_pretrained(name_or_path, **kwargs))

    @property
    def feature_size(self) -> int:
        return self.encoder.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features `[B, N, hidden_size]`; the weights are frozen, but gradients flow back to `images`."""
        pixels = (images.float() + 1) / 2
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size,) * 2, mode="bicubic", align_corners=False)
        pixels = ((pixels - self.mean) / self.std).to(self.encoder.dtype)
        hidden = self.encoder(pixel_values=pixels).last_hidden_state
        return hidden[:, self.num_prefix_tokens :]


def vae_loss(
    vae: AutoencoderKL,
    images: torch.Tensor,
    kl_weight: float = 1e-6,
    l1_weight: float = 1.0,
    mse_weight: float = 1.0,
    perceptual: FrozenVisionFeatures | None = None,
    perceptual_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction loss of an `AutoencoderKL` on images `[B, 3, H, W]` in [-1, 1]:
    `l1 * |x - x'| + mse * (x - x')^2 + kl * KL(q(z|x) || N(0, 1)) + perceptual * feature distance`, where the
    decoder reconstructs a posterior sample and the feature distance is `1 - cosine` of `perceptual`'s patch
    features. Returns the loss and its parts (detached) for logging."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample.float()
    images = images.float()
    parts = {
        "l1": F.l1_loss(reconstruction, images),
        "mse": F.mse_loss(reconstruction, images),
        "kl": posterior.kl().mean() / images[0].numel(),
    }
    loss = l1_weight * parts["l1"] + mse_weight * parts["mse"] + kl_weight * parts["kl"]
    if perceptual is not None and perceptual_weight > 0:
        with torch.no_grad():
            target = perceptual(images)
        features = perceptual(reconstruction)
        parts["perceptual"] = 1 - F.cosine_similarity(features.float(), target.float(), dim=-1).mean()
        loss = loss + perceptual_weight * parts["perceptual"]
    return loss, {name: value.detach() for name, value in parts.items()}
