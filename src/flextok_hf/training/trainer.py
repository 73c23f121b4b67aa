"""The training loop every stage shares, on accelerate: one process, DDP or FSDP from the same code.

A stage supplies the model, a loss function and a data stream; this module does the rest (optimiser and schedule,
mixed precision, gradient accumulation and clipping, EMA, checkpoints and resume, trackers, progress bar, export).
"""

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm

from .checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainingConfig, save_config

logger = get_logger(__name__)

LossFunction = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


LOG_FILE = "logs.jsonl"


@dataclass
class TrainingResult:
    """What a finished run leaves: the exported model folder, the last step and the last logged losses. Every
    logged entry is also a line of `output_dir/logs.jsonl` (with its `step`), whatever the trackers."""

    model_dir: Path | None
    step: int
    last_logs: dict[str, float]


def build_accelerator(config: TrainingConfig) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
    )
    # Each rank draws its own noise and augmentations; resume restores every rank's generators.
    set_seed(config.seed, device_specific=True)
    return accelerator


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class BatchStream:
    """Endless batches of a stream, pass after pass, whose position can be saved and restored exactly.

    torchdata's `StatefulDataLoader` keeps the position, also with worker processes reading ahead
    (`dataloader_num_workers`); each new pass of a `datasets` stream starts with `set_epoch`. The loader has its
    own generator, so starting a pass draws nothing from the global RNG that noise and dropout use.
    """

    def __init__(self, dataset: IterableDataset, config: TrainingConfig, collate_fn: Callable):
        self.dataset = dataset
        self.source = config.train_data
        self.epoch = 0
        self.loader = StatefulDataLoader(
            dataset,
            batch_size=config.train_batch_size,
            collate_fn=collate_fn,
            num_workers=config.dataloader_num_workers,
            generator=torch.Generator(),
        )
        self.resumed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        first_pass = True
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            # A resumed stream may start at the very end of a pass; a pass from the start must yield something.
            if not yielded and not (first_pass and self.resumed):
                raise ValueError(f"The training data {self.source!r} yielded no usable example.")
            first_pass = False
            self.epoch += 1
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]):
        self.epoch = state["epoch"]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self.resumed = True


def keep_log_until(path: Path, step: int):
    """Drops the entries after `step` from a run's log: a fresh run starts it anew, a resumed one continues it."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def recording_keys(stream: Iterator[dict[str, Any]], path: Path) -> Iterator[dict[str, Any]]:
    """Passes the batches through, appending each example's key to `path`."""
    for batch in stream:
        with open(path, "a") as file:
            file.writelines(f"{key}\n" for key in batch["keys"])
        yield batch


def train(
    config: TrainingConfig,
    accelerator: Accelerator,
    model: nn.Module,
    compute_loss: LossFunction,
    dataset: IterableDataset,
    collate_fn: Callable,
    export: Callable[[nn.Module, Path, dict[str, float]], None],
    data_stats: Any = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainingResult:
    """Trains `model` on `dataset` for `config.max_train_steps` optimiser steps.

    Args:
        compute_loss: `(model, batch) -> (loss, logs)`; the batch is what `collate_fn` returns, still on the CPU.
        dataset: this rank's share of the stream (`datasets.distributed.split_dataset_by_node`); a `datasets`
            stream's position is saved with every checkpoint and restored on resume (see [`BatchStream`]).
        export: `(unwrapped model with the final (EMA) weights, folder, last logged metrics)`, called on the main
            process at the end; writes the model there with `save_pretrained` (and a model card).
        data_stats: an object with `as_dict()` (counts of skipped images), logged with the losses.
        evaluate: `(unwrapped model) -> metrics`, run without gradients on every process at each logging step and
            logged with the losses; it must use no global random state (resumed runs stay exact).

    Returns:
        [`TrainingResult`].
    """
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "training_config.json")
    model, optimizer, lr_scheduler, ema = prepare_training(config, accelerator, model)
    parameters = trainable_parameters(model)

    stream = BatchStream(dataset, config, collate_fn)
    step = 0
    checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        step = state["step"]
        stream.load_state_dict(state["data_state"][accelerator.process_index])
        logger.info(f"Resumed from {checkpoint} at step {step}")

    if accelerator.is_main_process:
        keep_log_until(output_dir / LOG_FILE, step)
    if accelerator.is_main_process and config.report_to:
        accelerator.init_trackers(config.tracker_project_name, config={k: str(v) for k, v in config.to_dict().items()})
    num_parameters = sum(p.numel() for p in parameters)
    logger.info(
        f"Training {num_parameters / 1e6:.2f}M parameters for {config.max_train_steps} steps, "
        f"global batch {config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes}"
    )
    progress = tqdm(
        total=config.max_train_steps, initial=step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    batches = iter(stream)
    if config.record_example_keys:
        batches = recording_keys(batches, output_dir / f"example_keys_rank{accelerator.process_index}.txt")
    last_logs: dict[str, float] = {}
    running: dict[str, torch.Tensor] = {}  # sums since the last log, kept on the device (no sync per step)
    steps_since_log = 0
    while step < config.max_train_steps:
        logs = optimizer_step(config, accelerator, model, optimizer, lr_scheduler, compute_loss, batches)
        if ema is not None:
            ema.step(parameters)
        step += 1
        steps_since_log += 1
        progress.update(1)
        for name, value in logs.items():
            running[name] = running.get(name, 0) + torch.as_tensor(value, device=accelerator.device).float()

        if step % config.logging_steps == 0 or step == config.max_train_steps:
            # Means over the steps since the last log and over the processes.
            last_logs = {
                name: accelerator.reduce(total / steps_since_log, "mean").item() for name, total in running.items()
            }
            running, steps_since_log = {}, 0
            last_logs["lr"] = lr_scheduler.get_last_lr()[0]
            if data_stats is not None:
                last_logs.update(data_stats.as_dict())
            if evaluate is not None:
                with torch.no_grad():
                    last_logs.update(evaluate(accelerator.unwrap_model(model)))
            accelerator.log(last_logs, step=step)
            if accelerator.is_main_process:
                with open(output_dir / LOG_FILE, "a") as log_file:
                    log_file.write(json.dumps({"step": step, **last_logs}) + "\n")
            progress.set_postfix(loss=f"{last_logs['loss']:.4f}")
        if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
            save_checkpoint(
                accelerator,
                output_dir,
                step,
                {"data_state": gather_objects(accelerator, stream.state_dict())},
                config.checkpoints_total_limit,
            )
    progress.close()

    model_dir = None
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(trainable_parameters(unwrapped))
    if accelerator.is_main_process:
        model_dir = export_atomically(output_dir / "model", lambda folder: export(unwrapped, folder, last_logs))
    accelerator.end_training()
    return TrainingResult(model_dir=model_dir, step=step, last_logs=last_logs)


def prepare_training(config: TrainingConfig, accelerator: Accelerator, model: nn.Module):
    """AdamW over the trainable parameters, the warm-up + decay schedule, `torch.compile` if asked, accelerate's
    wrapping (device, precision, DDP/FSDP) and the EMA weights. Returns `(model, optimizer, lr_scheduler, ema)`."""
    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("The model has no trainable parameters: check the freeze options.")
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=accelerator.device.type == "cuda",
    )
    # accelerate steps a prepared scheduler once per process for every optimiser step, as in diffusers' examples.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    if config.compile:
        model.compile()
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = None
    if config.use_ema:
        ema = EMAModel(
            trainable_parameters(model), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, foreach=True
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    return model, optimizer, lr_scheduler, ema


def optimizer_step(config, accelerator, model, optimizer, lr_scheduler, compute_loss, stream) -> dict[str, Any]:
    """One optimiser step over `gradient_accumulation_steps` batches of `stream`, gradients clipped to
    `max_grad_norm`. Returns the last batch's loss and logs, and the gradient norm, as tensors (no sync)."""
    for _ in range(config.gradient_accumulation_steps):
        batch = next(stream)
        with accelerator.accumulate(model):
            loss, logs = compute_loss(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), **logs, "grad_norm": grad_norm}


def gather_objects(accelerator: Accelerator, value: Any) -> list[Any]:
    """One entry per rank (every rank's stream position goes into the checkpoint)."""
    return [value] if accelerator.num_processes == 1 else gather_object([value])


def export_atomically(folder: Path, write: Callable[[Path], None]) -> Path:
    """Lets `write` fill a folder beside `folder`, then swaps it in, so `folder` is always complete."""
    temporary = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder
