"""A tokenizer trained from scratch must learn to read its tokens: the encoder gets a gradient from the start, and a
short run makes the decoder's loss with an image's own tokens lower than with another image's."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_flextok_config

from flextok_hf import FlexTokModel
from flextok_hf.training.demo_data import procedural_image
from flextok_hf.training.tokenizer import token_dependence


def image_like_latents(num_images: int, seed: int = 0) -> torch.Tensor:
    """Procedural images pooled to the tiny model's 8x8 latent grid, 3 channels, unit variance: smooth, image-like
    latents such as a trained VAE gives (no VAE needed: the model takes latents)."""
    rng = np.random.default_rng(seed)
    images = np.stack([np.asarray(procedural_image(rng, 32)) for _ in range(num_images)])
    latents = torch.nn.functional.avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 4)
    return (latents - latents.mean()) / latents.std()


def fresh_model(seed: int = 0) -> FlexTokModel:
    """A tiny model with the default initialisation, for 3-channel latents."""
    torch.manual_seed(seed)
    vae_config = dict(tiny_flextok_config().vae_config, latent_channels=3)
    return FlexTokModel(tiny_flextok_config(vae_config=vae_config, fsq_levels=[8, 5, 5]))


def test_the_encoder_gets_a_gradient_and_distinct_tokens_at_initialisation():
    model = fresh_model()
    latents = image_like_latents(8)
    _, token_ids = model.quantizer(model.encoder(latents))
    assert len({tuple(ids) for ids in token_ids.tolist()}) > 1, "every image got the same tokens"
    # adaLN-zero gates the decoder shut at step 0; open them as the first steps do, with the encoder untouched.
    with torch.no_grad():
        for name, parameter in model.decoder.named_parameters():
            if "adaln_modulation" in name or name.startswith("output_proj"):
                parameter.normal_(0.0, 0.1)
    output = model.train()(latents=latents, keep_k=torch.full((8,), 8), null_condition_mask=torch.zeros(8, dtype=bool))
    output.loss.backward()
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"encoder.{name} gets no gradient"


def test_short_training_makes_the_decoder_read_the_tokens():
    model = fresh_model().train()
    latents = image_like_latents(16)
    before = token_dependence(model, latents, num_draws=8, seed=1)
    # The decoder starts as the zero velocity whatever the condition (adaLN-zero).
    assert before["flow_loss_true_tokens"] == pytest.approx(before["flow_loss_shuffled_tokens"], rel=1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(60):
        model(latents=latents).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = token_dependence(model, latents, num_draws=8, seed=1)
    assert after["flow_loss_true_tokens"] < 0.6 * before["flow_loss_true_tokens"]  # measured 0.50
    # Measured: true 1.008, shuffled 1.161 (ratio 0.87); over seeds 0-4 the ratio is 0.73 to 0.95.
    assert after["flow_loss_true_tokens"] < 0.93 * after["flow_loss_shuffled_tokens"]


def test_token_dependence_needs_two_images():
    with pytest.raises(ValueError, match="B >= 2"):
        token_dependence(fresh_model(), image_like_latents(1))
