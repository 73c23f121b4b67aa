"""Tiny random FlexTok models for fast offline tests."""

import torch

from flextok_hf import FlexTokARConfig, FlexTokARModel, FlexTokConfig, FlexTokModel
from flextok_hf.configuration_flextok import DEFAULT_VAE_CONFIG


def tiny_flextok_config(**overrides) -> FlexTokConfig:
    """A 2-block VAE (factor 2) with 4 latent channels, 16x16 images -> 4x4 patch grid, 8 registers."""
    vae_config = dict(
        DEFAULT_VAE_CONFIG,
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=4,
    )
    settings = dict(
        vae_config=vae_config,
        image_size=16,
        patch_size=2,
        max_grid_size=4,
        num_registers=8,
        fsq_levels=[8, 5, 5, 5],
        encoder_hidden_size=64,
        encoder_num_layers=2,
        encoder_head_dim=32,
        decoder_hidden_size=64,
        decoder_num_layers=2,
        decoder_head_dim=32,
    )
    settings.update(overrides)
    return FlexTokConfig(**settings)


def random_flextok_model(seed: int = 0, **overrides) -> FlexTokModel:
    """A tiny model with every weight random (the zero-initialised heads included), so outputs depend on all
    of them. Sin-cos position tables keep their fixed values."""
    torch.manual_seed(seed)
    model = FlexTokModel(tiny_flextok_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("vae."):
                parameter.normal_(0.0, 0.3)
    return model.eval()


def random_images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_ar_config(text_conditional: bool = False, **overrides) -> FlexTokARConfig:
    """A 2-layer AR generator over 64 ids and 8 positions; class-conditional (10 classes) or conditioned on
    384-dimensional text states (all-MiniLM-L6-v2's)."""
    settings = dict(
        vocab_size=64,
        max_position_embeddings=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_classes=None if text_conditional else 10,
        text_hidden_size=384 if text_conditional else None,
    )
    settings.update(overrides)
    return FlexTokARConfig(**settings)


def random_ar_model(seed: int = 0, text_conditional: bool = False, **overrides) -> FlexTokARModel:
    torch.manual_seed(seed)
    return FlexTokARModel(tiny_ar_config(text_conditional, **overrides)).eval()
