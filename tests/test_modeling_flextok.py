import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from huggingface_hub.errors import StrictDataclassError
from reference_format import reference_config_nodes, reference_state_dict, write_hub_format, write_metadata_format
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import random_ar_model, random_flextok_model, random_images, tiny_flextok_config
from transformers import AutoConfig, AutoModel

from flextok_hf import FlexTokConfig, FlexTokModel
from flextok_hf.convert_flextok_checkpoint import convert_checkpoint


@pytest.fixture(scope="module")
def model():
    return random_flextok_model()


@pytest.fixture(scope="module")
def images():
    return random_images(3)


def decoder_inputs(model, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    latent = config.image_size // config.vae_downsample_factor
    noisy = torch.randn(batch, config.latent_channels, latent, latent, generator=generator)
    timesteps = torch.rand(batch, generator=generator)
    ids = torch.randint(config.codebook_size, (batch, config.num_registers), generator=generator)
    return noisy, timesteps, model.quantizer.indices_to_codes(ids)


# ------------------------------------------------------------------------------------------------- config


def test_config_round_trip_and_auto_classes(tmp_path):
    config = tiny_flextok_config(decoder_register_steps=["nested_dropout", "position_embedding", "null_condition"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FlexTokConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert isinstance(AutoModel.from_config(loaded), FlexTokModel)
    assert config.codebook_size == 8 * 5 * 5 * 5 and config.image_multiple == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_registers": "eight"}, "field 'num_registers'"),
        ({"num_registers": 0}, "field 'num_registers'"),
        ({"encoder_mlp_ratio": "4"}, "field 'encoder_mlp_ratio'"),
        ({"qk_norm": 1}, "field 'qk_norm'"),
        ({"fsq_levels": [8, "5"]}, "field 'fsq_levels'"),
        ({"null_condition_prob": 1.5}, "field 'null_condition_prob'"),
        ({"encoder_attention_mask": "sliding"}, "field 'encoder_attention_mask'"),
        ({"nested_dropout_mode": "random"}, "field 'nested_dropout_mode'"),
        ({"fsq_levels": [8, 1]}, "fsq_levels"),
        ({"decoder_register_steps": ["position_embedding", "nested_dropout"]}, "decoder_register_steps"),
        ({"encoder_hidden_size": 70}, "encoder_hidden_size"),
        ({"image_size": 18}, "image_size"),
        ({"image_size": 32}, "image_size"),
        ({"vae_config": {"latent_channels": 4}}, "block_out_channels"),
    ],
)
def test_config_rejects_bad_fields(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        tiny_flextok_config(**overrides)


def test_configs_do_not_share_the_default_vae_config():
    FlexTokConfig().vae_config["block_out_channels"][0] = 64
    assert FlexTokConfig().vae_config["block_out_channels"] == [128, 256, 512, 512]


def test_bad_config_json_is_refused_by_field_name(tmp_path):
    tiny_flextok_config().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_registers="eight")))
    with pytest.raises(StrictDataclassError, match="field 'num_registers'"):
        FlexTokModel.from_pretrained(tmp_path)


def test_fresh_model_follows_adaln_zero_init():
    model = FlexTokModel(tiny_flextok_config())
    noisy, timesteps, codes = decoder_inputs(model)
    with torch.no_grad():
        velocity = model.decoder(noisy, timesteps, codes)
    assert torch.count_nonzero(velocity) == 0  # zero-initialised output head
    assert all(torch.count_nonzero(b.adaln_modulation.weight) == 0 for b in model.decoder.blocks)
    assert torch.count_nonzero(model.encoder.registers) > 0


# ----------------------------------------------------------------------------------------------- tokenize


def test_encode_returns_token_ids(model, images):
    ids = model.encode(images)
    assert ids.dtype == torch.long and ids.shape == (3, model.config.num_registers)
    assert 0 <= ids.min() and ids.max() < model.config.codebook_size
    assert len(set(map(tuple, ids.tolist()))) > 1  # different images, different tokens
    out = model.encode(images, return_dict=True)
    assert torch.equal(out.token_ids, ids)
    assert torch.equal(model.quantizer.indices_to_codes(ids), out.codes)


def test_registers_are_causal(model, images):
    """Register i depends on registers 0..i only: perturbing register j changes no token before j."""
    with torch.no_grad():
        latents = model.encode_latents(images)
        reference = model.encoder(latents)
        original = model.encoder.registers.clone()
        # A random direction: a constant shift of all features would be invisible through every LayerNorm.
        model.encoder.registers[5] += torch.randn(original.shape[1], generator=torch.Generator().manual_seed(0))
        perturbed = model.encoder(latents)
        model.encoder.registers.copy_(original)
    assert torch.equal(reference[:, :5], perturbed[:, :5])
    assert not torch.allclose(reference[:, 5:], perturbed[:, 5:])


def test_fsq_round_trip_and_straight_through():
    model = FlexTokModel(tiny_flextok_config())
    quantizer = model.quantizer
    ids = torch.arange(quantizer.codebook_size)
    codes = quantizer.indices_to_codes(ids)
    assert codes.min() >= -1 and codes.max() <= 1
    # Latents that the tanh bound maps exactly onto each code quantise back to that code and id.
    levels = torch.tensor(quantizer.levels, dtype=torch.float64)
    half_range = (levels - 1) * (1 + 1e-3) / 2
    offset = (levels % 2 == 0).double() * 0.5
    shift = torch.atanh(offset / half_range)
    latents = torch.atanh((codes.double() * (levels // 2) + offset) / half_range) - shift
    requantised, requantised_ids = quantizer(latents.float())
    assert torch.equal(requantised_ids, ids) and torch.equal(requantised, codes)
    z = torch.randn(4, 4, requires_grad=True)
    quantizer(z)[0].sum().backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0


# --------------------------------------------------------------------------------------------- detokenize


def test_decode_variable_lengths_in_one_batched_call_per_step(model, images):
    ids = model.encode(images)
    prefixes = [ids[0, :8], ids[1, :3], ids[2, :1]]
    calls = []
    hook = model.decoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        batched = model.decode(prefixes, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert calls == [6, 6, 6]  # cond and uncond of three images, one call per step
    generator = torch.Generator().manual_seed(0)
    noise = model.prepare_latents(3, 16, 16, generator)
    for i, prefix in enumerate(prefixes):
        single = model.decode([prefix], num_inference_steps=3, latents=noise[i : i + 1])
        torch.testing.assert_close(single.images, batched.images[i : i + 1], rtol=1e-4, atol=1e-5)


def test_decode_depends_on_the_prefix_only(model, images):
    ids = model.encode(images)
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % model.config.codebook_size
    kwargs = dict(num_inference_steps=2, output_type="latent")
    first = model.decode(ids[:, :4], generator=torch.Generator().manual_seed(3), **kwargs)
    second = model.decode(changed[:, :4], generator=torch.Generator().manual_seed(3), **kwargs)
    longer = model.decode(changed[:, :5], generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(first.images, second.images)
    assert not torch.allclose(first.images, longer.images)


@pytest.mark.parametrize("guidance_scale, norm_guidance", [(1.0, False), (3.0, False), (7.5, True)])
def test_decode_is_reproducible_with_a_generator(model, images, guidance_scale, norm_guidance):
    ids = model.encode(images[:2])
    kwargs = dict(num_inference_steps=2, guidance_scale=guidance_scale, norm_guidance=norm_guidance)
    first = model.decode(ids, generator=torch.Generator().manual_seed(7), **kwargs).images
    again = model.decode(ids, generator=torch.Generator().manual_seed(7), **kwargs).images
    other = model.decode(ids, generator=torch.Generator().manual_seed(8), **kwargs).images
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_guidance_changes_the_result(model, images):
    ids = model.encode(images[:1])[:, :2]
    results = [
        model.decode(
            ids, num_inference_steps=2, guidance_scale=s, norm_guidance=apg, generator=torch.Generator().manual_seed(0)
        ).latents
        for s, apg in [(1.0, False), (3.0, False), (3.0, True)]
    ]
    assert not torch.allclose(results[0], results[1]) and not torch.allclose(results[1], results[2])


def test_decode_output_types(model, images):
    ids = model.encode(images[:2])

    def decode(kind):
        generator = torch.Generator().manual_seed(0)
        return model.decode(ids, num_inference_steps=1, output_type=kind, generator=generator).images

    pt, np_images, pil = decode("pt"), decode("np"), decode("pil")
    assert pt.shape == (2, 3, 16, 16) and pt.dtype == torch.float32
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 16, 16, 3)
    assert 0 <= np_images.min() and np_images.max() <= 1
    np.testing.assert_allclose(np_images, ((pt.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    assert decode("latent").shape == (2, 4, 8, 8)
    assert isinstance(model.decode(ids, num_inference_steps=1, return_dict=False), tuple)


def test_decode_conditions_the_model_on_the_scheduler_sigmas(model, images):
    """A scheduler with its own time shift changes both the stepping and the times the decoder is told."""
    ids = model.encode(images[:1])
    told = []
    hook = model.decoder.register_forward_hook(lambda module, args, output: told.append(args[1][0].item()))
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    try:
        model.decode(ids, num_inference_steps=4, guidance_scale=1.0, scheduler=shifted)
    finally:
        hook.remove()
    torch.testing.assert_close(torch.tensor(told), shifted.sigmas[:-1].cpu())
    assert told[1] == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))


def test_heun_decoding_is_second_order_on_a_flow_with_a_known_solution(model, monkeypatch):
    """The decoder replaced by the exact velocity of the rectified flow from N(0, 1) noise to N(mean, std^2) data:
    at noise level sigma the sample is (1 - sigma) * mean + r(sigma) * noise, r^2 = sigma^2 + (1 - sigma)^2 std^2,
    so the ODE from noise x(1) ends at mean + std * x(1) exactly. Euler's error halves when the steps double, Heun's
    quarters."""
    mean, std = 0.5, 0.5
    evaluated_at = []

    def exact_velocity(latents, sigma, *args):
        evaluated_at.append(sigma)
        variance = sigma**2 + (1 - sigma) ** 2 * std**2
        return -mean + (sigma - (1 - sigma) * std**2) * (latents - (1 - sigma) * mean) / variance

    monkeypatch.setattr(model, "guided_velocity", exact_velocity)
    noise = model.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    ids = torch.zeros(2, 1, dtype=torch.long)

    def error(scheduler, steps):
        evaluated_at.clear()
        kwargs = dict(num_inference_steps=steps, latents=noise, output_type="latent", scheduler=scheduler)
        latents = model.decode(ids, **kwargs).latents
        return (latents - (mean + std * noise)).abs().max().item()

    euler = {n: error(FlowMatchEulerDiscreteScheduler(), n) for n in (4, 8, 16)}
    assert evaluated_at == [i / 16 for i in range(16, 0, -1)]
    heun = {n: error(FlowMatchHeunDiscreteScheduler(), n) for n in (4, 8, 16)}
    # Heun evaluates at FlexTok's grid i/T too, twice at every inner level: 2T - 1 decoder evaluations.
    assert evaluated_at == [1.0] + [i / 16 for i in range(15, 0, -1) for _ in range(2)]
    assert 0.8 < math.log2(euler[8] / euler[16]) < 1.2
    assert 1.8 < math.log2(heun[8] / heun[16]) < 2.5
    for n in (4, 8):
        assert heun[n] < euler[2 * n]  # closer with fewer decoder evaluations (2n - 1)


def test_decode_smaller_images_than_the_default(model, images):
    ids = model.encode(images[:1, :, :8, :8])
    out = model.decode(ids, num_inference_steps=1, height=8, width=12)
    assert out.images.shape == (1, 3, 8, 12)


def test_reconstruct(model, images):
    out = model.reconstruct(
        images, num_tokens=[8, 2, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    ids = model.encode(images)
    prefixes = model.decode(
        [ids[0, :8], ids[1, :2], ids[2, :1]], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == images.shape and torch.equal(out.images, prefixes.images)  # each image's own prefix
    with pytest.raises(ValueError, match="num_tokens"):
        model.reconstruct(images, num_tokens=[1, 2])
    for bad in (0, 9, True, 2.5):
        with pytest.raises(ValueError, match=r"\[1, 8\]"):
            model.reconstruct(images, num_tokens=bad)
    short = model.reconstruct(images, num_tokens=np.int64(2), num_inference_steps=1, output_type="latent")
    assert short.images.shape == (3, 4, 8, 8)


def test_reconstruct_defaults_to_all_registers(model, images):
    kwargs = dict(num_inference_steps=1, output_type="latent")
    default = model.reconstruct(images, generator=torch.Generator().manual_seed(0), **kwargs)
    every = model.reconstruct(
        images, num_tokens=model.config.num_registers, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.equal(default.images, every.images)


# ------------------------------------------------------------------------------------------------ training


def test_training_loss_and_nested_dropout(images):
    model = random_flextok_model(seed=1).train()
    out = model(images)
    assert out.loss.ndim == 0 and out.loss > 0
    assert set(out.keep_k.tolist()) <= {1, 2, 4, 8}  # pow2 nested dropout
    out.loss.backward()
    assert model.encoder.registers.grad is not None  # gradients reach the encoder through FSQ
    assert all(p.grad is None for p in model.vae.parameters())  # the VAE is frozen
    fixed = dict(sigmas=torch.full((3,), 0.5), noise=torch.zeros(3, 4, 8, 8), keep_k=torch.tensor([8, 8, 8]))
    target = model(images, **fixed).target_velocity
    latents = model.encode_latents(images)
    torch.testing.assert_close(target, -latents)
    # The flow loss is the MSE between predicted and target velocity, the noisy input sigma * noise + (1 - sigma) * x.
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model(images, sigmas=torch.tensor([0.2, 0.5, 0.9]), noise=noise, keep_k=torch.tensor([8, 2, 1]))
    torch.testing.assert_close(out.flow_loss, F.mse_loss(out.predicted_velocity, noise - latents))
    torch.testing.assert_close(
        out.noisy_latents, out.sigmas.view(-1, 1, 1, 1) * noise + (1 - out.sigmas.view(-1, 1, 1, 1)) * latents
    )


def test_training_reduces_the_loss(images):
    model = random_flextok_model(seed=2).train()
    for parameter in model.parameters():
        parameter.data.mul_(0.3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    fixed = dict(
        noise=torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), sigmas=torch.full((3,), 0.6)
    )
    losses = []
    for _ in range(30):
        loss = model(
            images, keep_k=torch.tensor([8, 8, 8]), null_condition_mask=torch.zeros(3, dtype=torch.bool), **fixed
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(keep_k=torch.tensor([8.0, 8.0, 8.0])), "keep_k"),
        (dict(keep_k=torch.tensor([8, 8])), "keep_k"),
        (dict(sigmas=torch.tensor([0.5, 0.5])), "sigmas"),
        (dict(sigmas=torch.tensor([1, 0, 1])), "sigmas"),
        (dict(null_condition_mask=torch.tensor([0, 1, 0])), "null_condition_mask"),
        (dict(noise=torch.zeros(3, 4, 4, 4)), "noise"),
    ],
)
def test_bad_training_inputs_raise(model, images, bad, message):
    with pytest.raises(ValueError, match=message):
        model(images, **bad)


def test_forward_takes_images_or_precomputed_latents(model, images):
    fixed = dict(noise=torch.zeros(3, 4, 8, 8), sigmas=torch.full((3,), 0.5))
    from_images = model(images, **fixed)
    from_latents = model(latents=model.encode_latents(images), **fixed)
    torch.testing.assert_close(from_latents.loss, from_images.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(images, latents=model.encode_latents(images))
    with pytest.raises(ValueError, match="latents must be"):
        model(latents=torch.zeros(3, 3, 8, 8))


def test_encode_builds_no_autograd_graph(images):
    model = random_flextok_model().train()
    output = model.encode(images, return_dict=True)
    assert not output.codes.requires_grad and output.codes.grad_fn is None


@pytest.mark.parametrize("text", [False, True])
def test_training_step_compiles_without_graph_breaks(images, text):
    """The training losses do no host synchronisation: one graph each, no break (fullgraph=True raises on one)."""
    torch._dynamo.reset()
    if text:
        model = random_ar_model(text_conditional=True).train()
        inputs = dict(
            input_ids=torch.randint(0, 64, (2, 8)),
            encoder_hidden_states=torch.randn(2, 3, 384),
            encoder_attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        )
        inputs["labels"] = inputs["input_ids"]
    else:
        model = random_flextok_model(repa_layer=0, repa_feature_size=8, repa_projector_hidden_size=16).train()
        inputs = dict(latents=model.encode_latents(images), repa_target_features=torch.randn(3, 4, 8))
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    loss = compiled(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss) and next(p for p in model.parameters() if p.requires_grad).grad is not None


def test_repa_loss_aligns_decoder_features_with_vision_features(images):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = FlexTokModel(tiny_flextok_config(repa_layer=1, repa_feature_size=32, repa_projector_hidden_size=32))
    model.train()
    vision = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
    ).eval()
    with torch.no_grad():
        features = vision(pixel_values=images).last_hidden_state[:, 1:]  # 4x4 patch features, CLS dropped
    fixed = dict(sigmas=torch.full((3,), 0.5), noise=torch.zeros(3, 4, 8, 8), keep_k=torch.tensor([8, 8, 8]))
    output = model(images, repa_target_features=features, **fixed)
    torch.testing.assert_close(output.loss, output.flow_loss + model.config.repa_loss_weight * output.repa_loss)
    assert 0 <= output.repa_loss <= 2
    optimizer = torch.optim.Adam(model.repa_projector.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        model(images, repa_target_features=features, **fixed).repa_loss.backward()
        optimizer.step()
    assert model(images, repa_target_features=features, **fixed).repa_loss < 0.7 * output.repa_loss
    with pytest.raises(ValueError, match="REPA projector"):
        random_flextok_model()(images, repa_target_features=features)


def test_forward_tuple_matches_the_output_object(model, images):
    fixed = dict(noise=torch.zeros(3, 4, 8, 8), sigmas=torch.full((3,), 0.5))
    output = model(images, **fixed)
    as_tuple = model(images, return_dict=False, **fixed)
    assert len(as_tuple) == len(output.to_tuple())
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, output.to_tuple(), strict=True))


def test_gradient_checkpointing_gives_the_same_gradients(images):
    model = random_flextok_model(seed=5).train()
    fixed = dict(
        noise=torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        sigmas=torch.full((3,), 0.4),
        keep_k=torch.tensor([8, 2, 1]),
        null_condition_mask=torch.tensor([False, False, True]),
    )

    def loss_and_gradients():
        model.zero_grad()
        loss = model(images, **fixed).loss
        loss.backward()
        return loss.detach(), [
            p.grad.clone() for p in (model.encoder.registers, model.decoder.blocks[0].attn.q_proj.weight)
        ]

    loss, gradients = loss_and_gradients()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.decoder.blocks)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    torch.testing.assert_close(checkpointed_loss, loss)
    for ours, expected in zip(checkpointed_gradients, gradients, strict=True):
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("mode, allowed", [("uniform", set(range(1, 9))), ("uniform_pow2", {1, 2, 4, 8})])
def test_nested_dropout_modes(mode, allowed):
    model = FlexTokModel(tiny_flextok_config(nested_dropout_mode=mode))
    keep_k = model.sample_keep_k(500, "cpu")
    assert set(keep_k.tolist()) <= allowed and len(set(keep_k.tolist())) > 2


# -------------------------------------------------------------------------------------------- checkpoints


def test_save_and_load_round_trip(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, FlexTokModel)
    assert torch.equal(loaded.encode(images), model.encode(images))
    noisy, timesteps, codes = decoder_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.decoder(noisy, timesteps, codes), model.decoder(noisy, timesteps, codes), rtol=0, atol=0
        )


def test_missing_weights_raise_instead_of_random_init(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.position_table"]  # fixed tables are rebuilt, not needed in the file
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(FlexTokModel.from_pretrained(tmp_path).encode(images), model.encode(images))
    del weights["decoder.mask_token"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 weights .*: decoder\.mask_token"):
        AutoModel.from_pretrained(tmp_path)


def test_a_repa_projector_the_config_adds_starts_new(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    loaded, info = FlexTokModel.from_pretrained(tmp_path, repa_layer=1, repa_feature_size=8, output_loading_info=True)
    assert model.repa_projector is None and loaded.repa_projector is not None and not info["missing_keys"]
    assert all(torch.isfinite(p).all() for p in loaded.repa_projector.parameters())
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_released_format_gives_loading_info(model, tmp_path):
    state = reference_state_dict(model)
    write_hub_format(model, tmp_path, state={**state, "extra.weight": torch.zeros(2)})
    loaded, info = FlexTokModel.from_pretrained(tmp_path, output_loading_info=True)
    model.save_pretrained(tmp_path / "ours")
    _, our_info = FlexTokModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert isinstance(loaded, FlexTokModel) and info.keys() >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert info["unexpected_keys"] == {"extra.weight"} and not info["missing_keys"] and not info["mismatched_keys"]
    assert type(info["unexpected_keys"]) is type(our_info["unexpected_keys"])  # transformers' own kinds


def test_image_sizes_must_be_ints(model):
    with pytest.raises(ValueError, match="positive multiples"):
        model.check_image_size(16.0, 16)


def test_load_in_bfloat16(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = FlexTokModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.decoder.patch_embed.weight.dtype == torch.bfloat16
    ids = loaded.encode(images)
    out = loaded.decode(ids[:, :4], num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images.float()).all() and out.images.dtype == torch.bfloat16
    loaded.vae.float()  # documented: a float32 VAE with bfloat16 transformers
    out = loaded.decode(loaded.encode(images)[:, :4], num_inference_steps=1)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


# ------------------------------------------------------------------------------- the reference's formats


@pytest.mark.parametrize("per_subsequence", [True, False])
@pytest.mark.parametrize("layout", ["hub", "metadata"])
def test_load_reference_formats(tmp_path, images, layout, per_subsequence):
    original = random_flextok_model(
        seed=3,
        decoder_adaln_per_subsequence=per_subsequence,
        decoder_register_steps=["nested_dropout", "position_embedding", "null_condition"],
    )
    if layout == "hub":
        write_hub_format(original, tmp_path / "ckpt")
        source, vae_config = tmp_path / "ckpt", None  # vae_config.json found beside the checkpoint
    else:
        write_metadata_format(original, tmp_path / "single" / "model.safetensors")
        source, vae_config = tmp_path / "single" / "model.safetensors", original.config.vae_config
    loaded = FlexTokModel.from_pretrained(source, vae_config=vae_config)
    assert loaded.config.decoder_register_steps == original.config.decoder_register_steps
    assert loaded.config.decoder_adaln_per_subsequence == per_subsequence
    assert torch.equal(loaded.encode(images), original.encode(images))
    noisy, timesteps, codes = decoder_inputs(original)
    keep_k, null = torch.tensor([8, 3, 1]), torch.tensor([False, True, False])
    with torch.no_grad():
        expected = original.decoder(noisy, timesteps, codes, keep_k, null)
        torch.testing.assert_close(loaded.decoder(noisy, timesteps, codes, keep_k, null), expected, rtol=0, atol=0)


def test_convert_command_writes_our_format(tmp_path, images):
    original = random_flextok_model(seed=4)
    write_hub_format(original, tmp_path / "reference")
    convert_checkpoint(tmp_path / "reference", tmp_path / "converted")
    with open(tmp_path / "converted" / "config.json") as f:
        assert json.load(f)["model_type"] == "flextok"
    with safe_open(str(tmp_path / "converted" / "model.safetensors"), "pt") as f:
        assert "decoder.output_proj.weight" in set(f.keys())
    converted = FlexTokModel.from_pretrained(tmp_path / "converted")
    assert torch.equal(converted.encode(images), original.encode(images))
    convert_checkpoint(tmp_path / "reference", tmp_path / "converted")  # overwriting keeps a valid checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "reference"]


def test_reference_loader_refuses_unknown_targets(tmp_path):
    original = random_flextok_model()
    nodes = reference_config_nodes(original.config)
    nodes["decoder"]["module_dict"]["dec_time_embedder"]["_target_"] = "os.system"
    write_hub_format(original, tmp_path, nodes=nodes)
    with pytest.raises(ValueError, match="os.system"):
        FlexTokModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(("num_layers", "input_norm"), [(2, True), (3, False)])
def test_released_repa_head_is_kept(tmp_path, num_layers, input_norm):
    original = random_flextok_model(
        repa_layer=1,
        repa_feature_size=24,
        repa_projector_hidden_size=48,
        repa_projector_num_layers=num_layers,
        repa_projector_input_norm=input_norm,
    )
    write_hub_format(original, tmp_path)
    loaded = FlexTokModel.from_pretrained(tmp_path)
    for key in ("repa_layer", "repa_feature_size", "repa_projector_hidden_size", "repa_projector_num_layers"):
        assert getattr(loaded.config, key) == getattr(original.config, key)
    assert loaded.config.repa_projector_input_norm == input_norm

    # The head as the reference's MLPHead computes it, from the released weights: [norm,] (linear, SiLU)..., out_proj.
    head = {
        key.removeprefix("decoder.module_dict.dec_repa_head."): tensor
        for key, tensor in reference_state_dict(original).items()
        if key.startswith("decoder.module_dict.dec_repa_head.")
    }
    hidden = torch.randn(2, 5, 64)
    expected = F.layer_norm(hidden, (64,)) if input_norm else hidden
    for index in sorted({int(key.split(".")[1]) for key in head if key.startswith("mlp.")}):
        expected = F.silu(F.linear(expected, head[f"mlp.{index}.weight"], head[f"mlp.{index}.bias"]))
    expected = F.linear(expected, head["out_proj.weight"], head["out_proj.bias"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.repa_projector(hidden), expected)


@pytest.mark.parametrize("unusable", [{"read_key": "elsewhere"}, {"use_mup_readout": True}, {"dim": 32}])
def test_reference_loader_reports_repa_heads_it_cannot_keep(tmp_path, images, caplog, unusable):
    original = random_flextok_model(repa_layer=0, repa_feature_size=32, repa_projector_hidden_size=256)
    nodes = reference_config_nodes(original.config)
    nodes["decoder"]["module_dict"]["dec_repa_head"].update(unusable)
    write_hub_format(original, tmp_path, nodes=nodes)
    with caplog.at_level("WARNING"):
        loaded = FlexTokModel.from_pretrained(tmp_path)
    assert loaded.repa_projector is None and loaded.config.repa_layer is None
    assert "Ignoring training-only module decoder.module_dict.dec_repa_head" in caplog.text
    assert "Unused weights" in caplog.text
    assert torch.equal(loaded.encode(images), original.encode(images))


def test_reference_loader_rejects_mismatched_checkpoints(tmp_path):
    original = random_flextok_model()
    state = reference_state_dict(original)
    del state["decoder.module_dict.dec_latent_dropout.nullcond"]
    write_hub_format(original, tmp_path / "missing", state=state)
    with pytest.raises(ValueError, match="missing"):
        FlexTokModel.from_pretrained(tmp_path / "missing")

    nodes = reference_config_nodes(original.config)
    nodes["encoder"]["module_dict"]["enc_transformer"]["dim"] = 128
    write_hub_format(original, tmp_path / "shape", nodes=nodes)
    with pytest.raises(ValueError, match="shape"):
        FlexTokModel.from_pretrained(tmp_path / "shape")

    write_hub_format(original, tmp_path / "vae")
    with pytest.raises(ValueError, match="latent channels"):
        FlexTokModel.from_pretrained(tmp_path / "vae", vae_config=dict(original.config.vae_config, latent_channels=16))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad_images, message",
    [
        (torch.zeros(1, 3, 18, 16), "multiples of 4"),
        (torch.zeros(1, 3, 32, 32), "at most 16"),
        (torch.zeros(1, 4, 16, 16), r"\[B, 3, H, W\]"),
        (torch.zeros(3, 16, 16), r"\[B, 3, H, W\]"),
        (torch.full((1, 3, 16, 16), 255.0), r"\[-1, 1\]"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating-point"),
        (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
        (torch.rand(0, 3, 16, 16), "empty batch"),
    ],
)
def test_bad_images_raise(model, bad_images, message):
    with pytest.raises(ValueError, match=message):
        model.encode(bad_images)


@pytest.mark.parametrize(
    "bad_ids, message",
    [
        (torch.full((1, 4), 1000), "vocabulary"),
        (torch.full((1, 4), -1), "vocabulary"),
        (torch.zeros(1, 9, dtype=torch.long), "1 to 8"),
        ([torch.zeros(2, dtype=torch.long), torch.zeros(0, dtype=torch.long)], "1 to 8"),
        (torch.zeros(1, 4), "integer"),
        (torch.zeros(4, dtype=torch.long), r"\[B, k\]"),
        ([], r"\[B, k\]"),
    ],
)
def test_bad_token_ids_raise(model, bad_ids, message):
    with pytest.raises(ValueError, match=message):
        model.decode(bad_ids, num_inference_steps=1)


def test_bad_decode_arguments_raise(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="output_type"):
        model.decode(ids, num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="num_inference_steps"):
        model.decode(ids, num_inference_steps=0)
    with pytest.raises(ValueError, match="multiples"):
        model.decode(ids, num_inference_steps=1, height=10)
    with pytest.raises(ValueError, match="got 0x16"):
        model.decode(ids, num_inference_steps=1, height=0)
    with pytest.raises(ValueError, match="generators"):
        model.decode(ids, num_inference_steps=1, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\)"):
        model.decode(ids, num_inference_steps=1, latents=torch.zeros(1, 4, 4, 4))
    for scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
            model.decode(ids, num_inference_steps=1, guidance_scale=scale)


def test_vae_config_is_refused_for_our_format(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="reference format"):
        FlexTokModel.from_pretrained(tmp_path, vae_config={"latent_channels": 4})


def test_posterior_samples_follow_the_generator(images):
    model = random_flextok_model(vae_sample_posterior=True)

    def latents(seed):
        return model.encode(images, return_dict=True, generator=torch.Generator().manual_seed(seed)).latents

    assert torch.equal(latents(0), latents(0)) and not torch.equal(latents(0), latents(1))
    # Drawn image by image: one generator per image gives each image the sample it gets alone.
    alone = [
        model.encode(images[i : i + 1], return_dict=True, generator=torch.Generator().manual_seed(i)).latents
        for i in range(len(images))
    ]
    together = model.encode(
        images, return_dict=True, generator=[torch.Generator().manual_seed(i) for i in range(len(images))]
    ).latents
    torch.testing.assert_close(together, torch.cat(alone))  # equal noise; the VAE rounds batches differently
    with pytest.raises(ValueError, match="one generator per image"):
        model.encode(images, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="`generator` must be a torch.Generator"):
        model.encode(images, generator=5)
    with pytest.raises(ValueError, match="one generator per image"):  # checked whether or not the posterior is sampled
        random_flextok_model().encode(images, generator=[torch.Generator()])
