"""Training on several CPU processes over gloo, launched with the shipped accelerate config files: FSDP (full
sharding, bf16, activation checkpointing) trains and exports the tokenizer, and the checkpoint of a 2-process run,
DDP or FSDP, resumes on 1 process and on 2 to the same state as the run that was not stopped.

accelerate applies FSDP settings only on accelerator devices; `tests/cpu_fsdp.py` lets it take the same path on CPU
processes. NCCL and GPUs are not tested here.
"""

import json
import shutil
import socket
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_training_runs import (  # noqa: F401 (image_folder, synthetic_token_data: fixtures)
    TINY_AR_MODEL,
    TOKENIZER_CONFIG,
    image_folder,
    run_command,
    synthetic_token_data,
)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from flextok_hf import FlexTokModel
from flextok_hf.training.checkpointing import load_checkpoint
from flextok_hf.training.trainer import stream_indices

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
LAUNCH_CONFIGS = {"ddp": CONFIGS / "accelerate_ddp_2gpu.yaml", "fsdp": CONFIGS / "accelerate_fsdp_2gpu.yaml"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(distribution: str, num_processes: int, script: str, argv: list[str], launch_options=()):
    """Runs training/<script>.py on `num_processes` CPU processes with accelerate launch and the shipped config
    (FSDP through tests/cpu_fsdp.py); a single process without FSDP is a plain `python` run."""
    script_argv = [str(ROOT / "training" / f"{script}.py"), *argv, "--cpu", "true"]
    if distribution == "ddp" and num_processes == 1:
        return run_command([sys.executable, *script_argv], timeout=600)
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS[distribution]),
        "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *launch_options,
    ]  # fmt: skip
    wrapper = [str(ROOT / "tests" / "cpu_fsdp.py")] if distribution == "fsdp" else []
    run_command([*accelerate, *wrapper, *script_argv], timeout=600)


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (weights, optimizer moments, EMA weights), whole, by file and key path;
    sharded `torch.distributed.checkpoint` folders are read back in this single process."""
    tensors = {}

    def collect(value, path):
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, dict | list):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                collect(item, f"{path}/{key}")

    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            collect(load_file(path), path.name)
        elif path.name in ("optimizer.bin", "scheduler.bin"):
            collect(torch.load(path, weights_only=True), path.name)
        elif (path / ".metadata").is_file():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_to_torch_save(path, scratch / f"{path.name}.pt")
            collect(torch.load(scratch / f"{path.name}.pt", weights_only=True), path.name)
    return tensors


def test_fsdp_trains_the_tokenizer_and_exports_the_gathered_model(image_folder, tmp_path):  # noqa: F811
    output_dir = tmp_path / "fsdp"
    argv = [
        "--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(output_dir),
        "--max_train_steps", "4", "--checkpointing_steps", "4", "--logging_steps", "2",
    ]  # fmt: skip
    launch("fsdp", 2, "train_tokenizer", argv, launch_options=["--fsdp_activation_checkpointing", "true"])

    logs = [json.loads(line) for line in (output_dir / "logs.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [2, 4] and all(0 < entry["loss"] < 10 for entry in logs)
    checkpoint = output_dir / "checkpoint-4"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0", "ema_weights"):  # each process wrote its own shards
        assert {p.name for p in (checkpoint / folder).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    saved = checkpoint_tensors(checkpoint, tmp_path)
    model_keys = {key.split("/", 2)[2] for key in saved if key.startswith("pytorch_model_fsdp_0/")}
    ema = {key.split("/", 1)[1]: value for key, value in saved.items() if key.startswith("ema_weights/")}

    model = FlexTokModel.from_pretrained(output_dir / "model")
    exported = model.state_dict()
    # Keys as the model names them (no activation-checkpointing wrappers), so any launch can resume it.
    assert model_keys == set(exported)
    assert ema and all(torch.equal(exported[name], weight) for name, weight in ema.items())  # the gathered EMA
    assert model.encode(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 8)


def test_data_streams_are_shared_out_among_the_processes():
    assert list(stream_indices(SimpleNamespace(num_processes=2, process_index=1), 4)) == [1, 3]
    assert list(stream_indices(SimpleNamespace(num_processes=1, process_index=0), 2)) == [0, 1]
    with pytest.raises(ValueError, match="divides 2, not 3"):
        stream_indices(SimpleNamespace(num_processes=3, process_index=0), 2)


AR_CONFIG = str(CONFIGS / "ar_tiny_cpu.yaml")
AR_MODEL = f"{{{TINY_AR_MODEL}, num_classes: 8, class_dropout_prob: 0.0}}"
# Each of 2 processes streams one shard of 4 sequences: 2 batches a pass, so the run stops in the middle of one.
BATCH, STOPPED_AT, STEPS = 2, 3, 6


def ar_argv(token_data, output_dir: Path, *options: str) -> list[str]:
    # No noise and no class dropout: the loss depends only on the examples, so runs on different numbers of
    # processes that train on the same global batches take the same steps.
    return [
        "--config", AR_CONFIG, "--token_data", str(token_data), "--output_dir", str(output_dir),
        "--model", AR_MODEL, "--max_train_steps", str(STEPS), "--checkpointing_steps", str(STOPPED_AT),
        "--logging_steps", "1", "--train_batch_size", str(BATCH), "--mixed_precision", "no",
        "--record_example_keys", "true", *options,
    ]  # fmt: skip


@pytest.mark.parametrize("distribution", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_on_one_or_two_processes(synthetic_token_data, tmp_path, distribution):  # noqa: F811
    straight = tmp_path / "straight"
    launch(distribution, 2, "train_ar", ar_argv(synthetic_token_data, straight))
    checkpoint = straight / f"checkpoint-{STOPPED_AT}"
    if distribution == "fsdp":
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(ValueError, match="written by an FSDP run"):
            load_checkpoint(Accelerator(cpu=True), checkpoint)
    expected = checkpoint_tensors(straight / f"checkpoint-{STEPS}", tmp_path)
    assert any("exp_avg_sq" in key for key in expected) and any(key.startswith("ema_weights/") for key in expected)
    logs = {json.loads(line)["step"]: json.loads(line) for line in (straight / "logs.jsonl").read_text().splitlines()}
    keys = [(straight / f"example_keys_stream{index}.txt").read_text().split() for index in (0, 1)]

    for num_processes in (1, 2):
        resumed = tmp_path / f"resumed_on_{num_processes}"
        shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns(f"checkpoint-{STEPS}", "model", "example_*"))
        # One process reads both streams in turn: two accumulated batches make the 2-process global batch.
        options = ["--resume_from_checkpoint", str(resumed / checkpoint.name)]
        options += ["--gradient_accumulation_steps", str(2 // num_processes)]
        launch(distribution, num_processes, "train_ar", ar_argv(synthetic_token_data, resumed, *options))

        for index in (0, 1):  # each stream goes on where it stopped: nothing repeated, nothing skipped
            resumed_keys = (resumed / f"example_keys_stream{index}.txt").read_text().split()
            assert resumed_keys == keys[index][STOPPED_AT * BATCH :]
        final = resumed / f"checkpoint-{STEPS}"
        state = json.loads((final / "trainer_state.json").read_text())
        assert state == json.loads((straight / final.name / "trainer_state.json").read_text())  # step, positions
        resumed_logs = [json.loads(line) for line in (resumed / "logs.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in resumed_logs] == list(range(1, STEPS + 1))
        assert all(entry["lr"] == logs[entry["step"]]["lr"] for entry in resumed_logs)
        tensors = checkpoint_tensors(final, tmp_path)
        assert tensors.keys() == expected.keys()
        for key, value in expected.items():  # weights, AdamW moments and steps, EMA weights
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=1e-6, msg=key)
