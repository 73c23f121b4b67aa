"""The shared training machinery: configs, atomic checkpoints, the loop's optimiser/EMA/resume logic."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tiny_models import random_flextok_model, random_images

from flextok_hf.training.ar import ARTrainingConfig, build_ar_model
from flextok_hf.training.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from flextok_hf.training.config import parse_config
from flextok_hf.training.tokenizer import TokenizerTrainingConfig, build_tokenizer
from flextok_hf.training.trainer import InPlaceEMAModel, compile_model

TOKENIZER_CONFIG = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "tokenizer_tiny_cpu.yaml")


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 1e-3, "model": {"num_registers": 8}, "report_to": None}))
    config = parse_config(
        TokenizerTrainingConfig, ["--config", str(path), "--learning_rate", "2e-4", "--model", "{num_registers: 16}"]
    )
    assert config.learning_rate == 2e-4 and config.model == {"num_registers": 16} and config.report_to is None
    assert parse_config(TokenizerTrainingConfig, ["--compile", "true"]).compile is True
    # diffusers-style spellings: --key=value, and a true/false setting given alone
    config = parse_config(TokenizerTrainingConfig, ["--max_train_steps=7", "--compile", "--seed", "3", "--use_ema"])
    assert (config.max_train_steps, config.compile, config.seed, config.use_ema) == (7, True, 3, True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "1"], "Unknown settings"),
        (["--train_batch_size", "eight"], "train_batch_size must be int"),
        (["--model", "[1, 2]"], "model must be dict"),
        (["--train_batch_size", "0"], "train_batch_size"),
        (["--mixed_precision", "fp8"], "mixed_precision"),
        (["--push_to_hub", "true"], "hub_model_id"),
        (["--freeze_encoder", "true", "--freeze_decoder", "true"], "nothing to train"),
        (["--logging_steps", "0"], "logging_steps must be at least 1"),
        (["--checkpoints_total_limit", "0"], "checkpoints_total_limit must be at least 1"),
        (["--logging_steps", "10", "--evaluation_steps", "15"], "evaluation_steps must be a multiple of logging_steps"),
    ],
)
def test_bad_configs_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(TokenizerTrainingConfig, argv)


def test_a_setting_without_its_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(TokenizerTrainingConfig, ["--learning_rate", "--seed", "1"])
    assert "--learning_rate needs a value" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "Set one of token_data"),
        (["--token_data", "tokens", "--train_data", "images"], "Set one of token_data"),
        (["--train_data", "images"], "needs tokenizer_name_or_path"),
    ],
)
def test_ar_configs_need_one_data_source(argv, message):
    from flextok_hf.training.ar import ARTrainingConfig

    with pytest.raises(ValueError, match=message):
        parse_config(ARTrainingConfig, argv)


def test_checkpoints_are_atomic_limited_and_resumable(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (1, 2, 3):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        save_checkpoint(accelerator, tmp_path, step, {"data_state": [{"position": step}]}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    # A save killed midway leaves only a temporary folder, which "latest" never picks.
    (tmp_path / ".tmp-checkpoint-4").mkdir()
    (tmp_path / "checkpoint-5").mkdir()  # no trainer state: incomplete, ignored too
    latest = resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-3"
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-5"))
    assert resolve_checkpoint(tmp_path / "fresh", "latest") is None

    # A save that dies partway (here: after the model's weights) leaves the last complete checkpoint the latest.
    save_state = accelerator.save_state

    def dying_save_state(output_dir, **kwargs):
        save_state(output_dir, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", dying_save_state)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 6, {"data_state": [{"position": 6}]}, total_limit=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert resolve_checkpoint(tmp_path, "latest") == latest

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    state = load_checkpoint(accelerator, latest)
    assert state == {"step": 3, "data_state": [{"position": 3}]}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vocab_size": 64}, "1000 token ids but the generator's vocab_size is 64"),
        ({"resolution": 32}, "image size, 16"),
    ],
)
def test_on_the_fly_tokenizer_must_fit_the_generator(tmp_path, overrides, message):
    from tiny_models import random_flextok_model, tiny_ar_config

    from flextok_hf.training.ar import ARTrainingConfig, load_frozen_tokenizer

    random_flextok_model().save_pretrained(tmp_path / "tokenizer")  # FSQ 8-5-5-5: 1000 ids, 16 px images
    config = ARTrainingConfig(
        train_data="images",
        tokenizer_name_or_path=str(tmp_path / "tokenizer"),
        resolution=overrides.get("resolution", 16),
    )
    with pytest.raises(ValueError, match=message):
        load_frozen_tokenizer(config, tiny_ar_config(vocab_size=overrides.get("vocab_size", 1000)), "cpu")


def test_in_place_ema_matches_diffusers_ema_model():
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours = InPlaceEMAModel(parameters, decay=0.9, use_ema_warmup=True, power=0.75)
    theirs = EMAModel(parameters, decay=0.9, use_ema_warmup=True, power=0.75, foreach=True)
    for _ in range(5):
        with torch.no_grad():
            for parameter in parameters:
                parameter.add_(torch.randn_like(parameter))
        ours.step(parameters)
        theirs.step(parameters)
        assert ours.cur_decay_value == theirs.cur_decay_value
        for mine, reference in zip(ours.shadow_params, theirs.shadow_params, strict=True):
            torch.testing.assert_close(mine, reference)
    assert not any(torch.equal(s, p) for s, p in zip(ours.shadow_params, parameters, strict=True))  # it averaged
    frozen = [torch.zeros(2, requires_grad=False)]
    with pytest.raises(ValueError, match="trainable parameters only"):
        InPlaceEMAModel(frozen).step(frozen)


def test_gradient_checkpointing_setting_checkpoints_every_block():
    tokenizer_config = parse_config(
        TokenizerTrainingConfig, ["--config", TOKENIZER_CONFIG, "--train_data", "unused", "--gradient_checkpointing"]
    )
    tokenizer, _ = build_tokenizer(tokenizer_config)
    blocks = [*tokenizer.encoder.blocks, *tokenizer.decoder.blocks]
    assert blocks and all(block.gradient_checkpointing for block in blocks)
    ar_config = ARTrainingConfig(model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
                                 gradient_checkpointing=True, token_data="unused")  # fmt: skip
    layers = build_ar_model(ar_config).layers
    assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers)


def test_compiling_the_blocks_keeps_the_loss_and_gradients():
    images = random_images(2)
    fixed = dict(
        noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        sigmas=torch.tensor([0.3, 0.7]),
        keep_k=torch.tensor([8, 2]),
        null_condition_mask=torch.tensor([False, True]),
    )

    def loss_and_gradients(model):
        loss = model(images, **fixed).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    eager = random_flextok_model(seed=1).train()
    compiled = random_flextok_model(seed=1).train()
    compile_model(compiled, "blocks")
    blocks = [*compiled.encoder.blocks, *compiled.decoder.blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their names
    loss, gradients = loss_and_gradients(eager)
    compiled_loss, compiled_gradients = loss_and_gradients(compiled)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    assert compiled_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-3, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="_repeated_blocks"):
        compile_model(torch.nn.Linear(2, 2), "blocks")
