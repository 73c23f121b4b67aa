"""The training loop every stage shares, on accelerate: one process, DDP or FSDP from the same code.

A stage supplies the model, a loss function and its data; this module does the rest (optimiser and schedule,
mixed precision, gradient accumulation and clipping, EMA, checkpoints and resume, trackers, progress bar, export).

Under FSDP (`accelerate launch --config_file training/configs/accelerate_fsdp_2gpu.yaml`) the parameters, their
gradients, the AdamW moments and the EMA weights are all sharded (DTensors); checkpoints are written shard by shard
with `torch.distributed.checkpoint`, and the exported model is gathered whole on the main process.
"""

import contextlib
import copy
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm

from .checkpointing import list_checkpoints, load_checkpoint, read_trainer_state, resolve_checkpoint, save_checkpoint
from .config import TrainingConfig, save_config
from .hub import create_hub_repo, push_folder

logger = get_logger(__name__)

LossFunction = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


LOG_FILE = "logs.jsonl"


class InPlaceEMAModel(EMAModel):
    """diffusers' `EMAModel` (its decay schedule, warm-up and attributes) with a cheaper update for trainable
    parameters: one in-place lerp per tensor. Its own foreach update first materialises `shadow - parameter` for
    every tensor at once, a second copy of the weights (10 GB at 2.5 B parameters), and reads the weights three
    times instead of twice; at d18-d28 it took 23 ms of each H100 step."""

    @torch.no_grad()
    def step(self, parameters: Iterable[nn.Parameter]):
        parameters = list(parameters)
        if not all(parameter.requires_grad for parameter in parameters):
            raise ValueError("InPlaceEMAModel averages trainable parameters only; pass those (trainable_parameters).")
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)
        # shadow - (1 - decay) * (shadow - parameter), as in EMAModel.step
        torch._foreach_lerp_(self.shadow_params, parameters, 1 - self.cur_decay_value)


@dataclass
class TrainingResult:
    """What a finished run leaves: the exported model folder, the last step and the last logged losses. Every
    logged entry is also a line of `output_dir/logs.jsonl` (with its `step`), whatever the trackers."""

    model_dir: Path | None
    step: int
    last_logs: dict[str, float]


def build_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's `Accelerator`; DDP or FSDP and their settings come from `accelerate launch` (its config file)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
        # The schedule counts optimiser steps (see `optimizer_step`), not optimiser steps x processes as accelerate
        # would: a checkpoint then resumes with the same learning rate on any number of processes.
        step_scheduler_with_optimizer=False,
    )
    if uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError(
            "The training code shards with FSDP2: set fsdp_version: 2 in the launch config's fsdp_config (as "
            "training/configs/accelerate_fsdp_2gpu.yaml does)."
        )
    fsdp_recomputes = uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.activation_checkpointing
    if fsdp_recomputes and config.gradient_checkpointing:
        raise ValueError(
            "gradient_checkpointing and the launch config's fsdp_activation_checkpointing both recompute every block "
            "in the backward pass: turn one of them off."
        )
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # The same seed everywhere until the model is built (FSDP2 does not broadcast rank 0's initial weights);
    # `train` then gives each process its own.
    set_seed(config.seed)
    show_run_messages()
    return accelerator


def show_run_messages():
    """Prints this package's INFO messages (where a run resumes, its size), which Python would otherwise drop;
    accelerate's logger keeps them to the main process. Other libraries keep their own levels."""
    package_logger = logging.getLogger("flextok_hf")
    package_logger.setLevel(logging.INFO)
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package_logger.addHandler(handler)


def uses_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


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


def stream_indices(accelerator: Accelerator, num_streams: int) -> range:
    """The data streams this process reads.

    A run splits its data into one stream per process of its first launch, and keeps that split when resumed: each
    process then reads every `num_processes`-th stream, in turn, from where the checkpoint left it. So a checkpoint
    of a 2-process run resumes on 1 process (reading both streams) or on 2, with no example repeated or skipped.
    """
    if num_streams % accelerator.num_processes:
        raise ValueError(
            f"The checkpoint reads its data as {num_streams} streams (one per process of the run that started it); "
            f"resume it on a number of processes that divides {num_streams}, not {accelerator.num_processes}."
        )
    return range(accelerator.process_index, num_streams, accelerator.num_processes)


def in_turn(iterators: list[Iterator[dict[str, Any]]], start: int) -> Iterator[dict[str, Any]]:
    """One batch from each iterator in turn, beginning with iterator `start % len(iterators)`."""
    for count in itertools.count(start):
        yield next(iterators[count % len(iterators)])


def keep_log_until(path: Path, step: int):
    """Drops the entries after `step` from a run's log: a fresh run starts it anew, a resumed one continues it."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def recording_keys(
    stream: Iterator[dict[str, Any]], path: Path, recorded: dict[int, int], index: int
) -> Iterator[dict[str, Any]]:
    """Passes the batches through, appending each example's key to `path` and counting them in `recorded[index]`
    (what a checkpoint keeps, so that a resumed run cuts the file back to it)."""
    for batch in stream:
        with open(path, "a") as file:
            file.writelines(f"{key}\n" for key in batch["keys"])
        recorded[index] += len(batch["keys"])
        yield batch


def keep_first_lines(path: Path, count: int):
    lines = path.read_text().splitlines(keepends=True)[:count] if path.exists() else []
    path.write_text("".join(lines))


def train(
    config: TrainingConfig,
    accelerator: Accelerator,
    model: nn.Module,
    compute_loss: LossFunction,
    data_part: Callable[[int, int], IterableDataset],
    collate_fn: Callable,
    export: Callable[[nn.Module, Path, dict[str, float]], None],
    data_stats: Any = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainingResult:
    """Trains `model` for `config.max_train_steps` optimiser steps.

    Args:
        compute_loss: `(model, batch) -> (loss, logs)`; the batch is what `collate_fn` returns, still on the CPU.
        data_part: `(index, count) -> stream`: the `index`-th of `count` disjoint parts of the training data
            (`datasets.distributed.split_dataset_by_node`). Each process reads its own parts (see
            [`stream_indices`]); a `datasets` stream's position is saved with every checkpoint and restored on resume
            (see [`BatchStream`]).
        export: `(whole model with the final (EMA) weights, folder, last logged metrics)`, called on the main
            process at the end; writes the model there with `save_pretrained` (and a model card).
        data_stats: an object with `as_dict()` (this process's counts of read and skipped images), logged with the
            losses as totals over the processes and the whole run (resumed runs included).
        evaluate: `(unwrapped model) -> metrics`, run without gradients on every process every
            `config.evaluation_steps` (at each logging step by default, and at the last) and logged with the losses;
            it must use no global random state (resumed runs stay exact).

    Returns:
        [`TrainingResult`].
    """
    output_dir = Path(config.output_dir)
    if config.resume_from_checkpoint is None and (old := list_checkpoints(output_dir)):
        raise ValueError(
            f"{output_dir} holds checkpoints of an earlier run ({old[-1].name}, ...), which this new run would mix "
            "with its own: resume it with --resume_from_checkpoint latest, or choose another output_dir."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "training_config.json")
        if config.push_to_hub:
            create_hub_repo(config)
    # Each process draws its own noise and augmentations from here; resume restores every process's generators.
    set_seed(config.seed, device_specific=True)
    # Under FSDP the model is sharded in place; the export loads the gathered weights into this weightless copy.
    export_frame = weightless_copy(model) if uses_fsdp(accelerator) and accelerator.is_main_process else None
    parameter_names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    model, optimizer, lr_scheduler, ema = prepare_training(config, accelerator, model)
    parameters = trainable_parameters(model)
    ema_weights = dict(zip(parameter_names, ema.shadow_params, strict=True)) if ema is not None else None

    step = 0
    checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
    if config.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.info(f"No checkpoint in {output_dir} yet: starting from step 0")
    trainer_state = read_trainer_state(checkpoint) if checkpoint is not None else None
    num_streams = len(trainer_state["data_state"]) if trainer_state else accelerator.num_processes
    counts_before = trainer_state.get("data_counts", {}) if trainer_state else {}  # of the runs this one resumes
    streams = {
        index: BatchStream(data_part(index, num_streams), config, collate_fn)
        for index in stream_indices(accelerator, num_streams)
    }
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, ema_weights)
        step = trainer_state["step"]
        # accelerate restores its count of micro-batches, which decides when accumulated gradients are applied:
        # recount them with this run's gradient_accumulation_steps (it may change, e.g. to keep the global batch).
        accelerator.step = step * config.gradient_accumulation_steps
        if ema is not None:
            ema.optimization_step = step
        for index, stream in streams.items():
            stream.load_state_dict(trainer_state["data_state"][index])
        logger.info(f"Resumed from {checkpoint} at step {step}")

    if accelerator.is_main_process:
        keep_log_until(output_dir / LOG_FILE, step)
    if accelerator.is_main_process and config.report_to:
        accelerator.init_trackers(config.tracker_project_name, config={k: str(v) for k, v in config.to_dict().items()})
    num_parameters = sum(p.numel() for p in parameters)  # a DTensor's numel is that of the whole tensor
    logger.info(
        f"Training {num_parameters / 1e6:.2f}M parameters for {config.max_train_steps} steps, "
        f"global batch {config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes}"
    )
    progress = tqdm(
        total=config.max_train_steps, initial=step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    iterators = [iter(stream) for stream in streams.values()]
    recorded = {}  # keys written per stream, up to this step
    if config.record_example_keys:
        counts_at_checkpoint = trainer_state.get("example_key_counts", []) if trainer_state else []
        for index in streams:
            recorded[index] = counts_at_checkpoint[index] if counts_at_checkpoint else 0
            keep_first_lines(output_dir / f"example_keys_stream{index}.txt", recorded[index])
        iterators = [
            recording_keys(iterator, output_dir / f"example_keys_stream{index}.txt", recorded, index)
            for index, iterator in zip(streams, iterators, strict=True)
        ]
    batches = in_turn(iterators, start=step * config.gradient_accumulation_steps)
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
                last_logs.update(run_data_counts(accelerator, data_stats, counts_before))
            evaluation_due = config.evaluation_steps is None or step % config.evaluation_steps == 0
            if evaluate is not None and (evaluation_due or step == config.max_train_steps):
                with torch.no_grad(), parameters_gathered(accelerator, model):
                    last_logs.update(evaluate(accelerator.unwrap_model(model)))
            accelerator.log(last_logs, step=step)
            if accelerator.is_main_process:
                with open(output_dir / LOG_FILE, "a") as log_file:
                    log_file.write(json.dumps({"step": step, **last_logs}) + "\n")
            progress.set_postfix(loss=f"{last_logs['loss']:.4f}")
        if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
            trainer_state = {"data_state": gather_stream_states(accelerator, streams)}
            if config.record_example_keys:
                trainer_state["example_key_counts"] = gather_by_stream(accelerator, recorded)
            if data_stats is not None:
                trainer_state["data_counts"] = run_data_counts(accelerator, data_stats, counts_before)
            save_checkpoint(accelerator, output_dir, step, trainer_state, config.checkpoints_total_limit, ema_weights)
    progress.close()

    model_dir = None
    accelerator.wait_for_everyone()
    if ema is not None:
        with torch.no_grad():  # not `ema.copy_to`: its torch._foreach_copy_ takes no DTensors (FSDP)
            for parameter, weight in zip(parameters, ema.shadow_params, strict=True):
                parameter.copy_(weight)
    final_model = whole_model(accelerator, model, export_frame)
    if accelerator.is_main_process:
        model_dir = export_atomically(output_dir / "model", lambda folder: export(final_model, folder, last_logs))
    # Every process tears the process group down together: one that leaves during the export can abort (gloo).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if model_dir is not None and config.push_to_hub:  # no process waits on the upload (a collective would time out)
        push_folder(model_dir, config)
    return TrainingResult(model_dir=model_dir, step=step, last_logs=last_logs)


def prepare_training(config: TrainingConfig, accelerator: Accelerator, model: nn.Module):
    """AdamW over the trainable parameters, the warm-up + decay schedule, `torch.compile` if asked, accelerate's
    wrapping (device, precision, DDP/FSDP) and the EMA weights. Returns `(model, optimizer, lr_scheduler, ema)`.

    Under FSDP every block class the model names in `_no_split_modules` is its own shard unit (unless the launch
    config names `fsdp_transformer_layer_cls_to_wrap`), and the EMA weights are DTensors sharded like the parameters.
    """
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
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    if uses_fsdp(accelerator) and accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap is None:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = block_class_names(model)
    if config.compile:
        compile_model(model, config.compile_scope)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = None
    if config.use_ema:
        ema = InPlaceEMAModel(  # its shadow weights are copies of the prepared (on-device) parameters
            trainable_parameters(model), decay=config.ema_decay, use_ema_warmup=config.ema_warmup
        )
    return model, optimizer, lr_scheduler, ema


def compile_model(model: nn.Module, scope: str = "model") -> None:
    """`torch.compile` in place: the whole model (`scope="model"`) or each block whose class the model names in
    `_repeated_blocks` (`"blocks"`, diffusers' convention for regional compilation: one compilation serves all the
    blocks of a shape, and the parameters keep their names)."""
    if scope not in ("model", "blocks"):
        raise ValueError(f"compile scope must be 'model' or 'blocks', got {scope!r}.")
    if scope == "model":
        model.compile()
        return
    block_names = set(getattr(model, "_repeated_blocks", ()))
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"compile_scope 'blocks' needs a model that names its repeated blocks in `_repeated_blocks`; "
            f"{type(model).__name__} names none: use compile_scope 'model'."
        )
    for block in blocks:
        block.compile()


def block_class_names(model: nn.Module) -> list[str]:
    """The block classes that the model and its submodules name in `_no_split_modules` and that it contains
    (transformers merges in the names of submodules' classes, such as the VAE's, even when absent)."""
    named = set()
    for module in model.modules():
        named.update(getattr(module, "_no_split_modules", None) or ())
    return sorted(named & {type(module).__name__ for module in model.modules()})


def optimizer_step(config, accelerator, model, optimizer, lr_scheduler, compute_loss, stream) -> dict[str, Any]:
    """One optimiser step over `gradient_accumulation_steps` batches of `stream`, gradients clipped to
    `max_grad_norm`. Returns the loss and logs averaged over those batches, and the gradient norm, as tensors (no
    sync)."""
    totals: dict[str, torch.Tensor] = {}
    for _ in range(config.gradient_accumulation_steps):
        batch = next(stream)
        with accelerator.accumulate(model):
            loss, logs = compute_loss(model, batch)
            for name, value in {"loss": loss, **logs}.items():
                totals[name] = totals.get(name, 0) + value.detach() / config.gradient_accumulation_steps
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards, replicated on every process
        grad_norm = grad_norm.full_tensor()
    return {**totals, "grad_norm": grad_norm}


@contextlib.contextmanager
def parameters_gathered(accelerator: Accelerator, model: nn.Module):
    """Lets code call the model's submodules directly (an evaluation), not only `model(...)`. Under FSDP that skips
    the root's hooks: its parameters are gathered here instead (the blocks gather their own), in the compute dtype,
    so inputs are autocast to it."""
    if not uses_fsdp(accelerator):
        yield
        return
    model.unshard()
    try:
        with accelerator.autocast():
            yield
    finally:
        model.reshard()


def gather_stream_states(accelerator: Accelerator, streams: dict[int, BatchStream]) -> list[dict[str, Any]]:
    """Every stream's position, from all processes, in stream order: what the checkpoint keeps."""
    return gather_by_stream(accelerator, {index: stream.state_dict() for index, stream in streams.items()})


def gather_by_stream(accelerator: Accelerator, values: dict[int, Any]) -> list[Any]:
    """This process's `{stream index: value}` joined with every other process's, as a list in stream order."""
    joined = {}
    for process_values in gather_object([values]):
        joined.update(process_values)
    return [joined[index] for index in sorted(joined)]


def weightless_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and saved buffers are on the meta device (no memory), ready for
    `load_state_dict(..., assign=True)`; buffers outside the state dict are copied."""
    memo = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                memo[id(buffer)] = buffer.to("meta")
    return copy.deepcopy(model, memo)


def whole_model(accelerator: Accelerator, model: nn.Module, export_frame: nn.Module | None) -> nn.Module | None:
    """The trained model, whole, for export on the main process. Under FSDP every process takes part in gathering
    the shards; the main process loads them into `export_frame` (on the CPU), the others get `None`."""
    if not uses_fsdp(accelerator):
        return accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    export_frame.load_state_dict(state_dict, assign=True)
    return export_frame


def run_data_counts(accelerator: Accelerator, data_stats: Any, counts_before: dict[str, int]) -> dict[str, int]:
    """Every process's counts summed, plus those of the runs this one resumes. Every process calls this."""
    return {
        name: int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum").item())
        + counts_before.get(name, 0)
        for name, count in data_stats.as_dict().items()
    }


def export_atomically(folder: Path, write: Callable[[Path], None]) -> Path:
    """Lets `write` fill a folder beside `folder`, then swaps it in, so `folder` is always complete."""
    temporary = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    return folder
