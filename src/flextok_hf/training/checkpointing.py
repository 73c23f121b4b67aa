"""Resumable training checkpoints, written so that a killed run never leaves one that `latest` would pick.

A checkpoint is `output_dir/checkpoint-<step>/`: accelerate's `save_state` (model, optimizer, LR scheduler, every
registered object, RNG states; under FSDP the model and optimizer as shards, with `torch.distributed.checkpoint`),
the EMA weights (`ema_weights/`, also with `torch.distributed.checkpoint`) and `trainer_state.json` (step, the data
streams' positions). It is written under a temporary name and renamed when complete; a rename within one file system
is atomic.

Sharded files are read back by any number of processes, so a checkpoint resumes on another number of processes:
DDP or single-process checkpoints without FSDP, FSDP checkpoints under FSDP (one process included).
"""

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as distributed_checkpoint
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.constants import FSDP_MODEL_NAME

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
EMA_WEIGHTS_NAME = "ema_weights"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted saves are not listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found) if (path / TRAINER_STATE_NAME).is_file()]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """`None` -> start fresh; "latest" -> the newest complete checkpoint of `output_dir` (`None` if there is none
    yet, so a restarted job starts fresh); otherwise a checkpoint folder, which must be complete."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"{path} is not a complete training checkpoint (no {TRAINER_STATE_NAME}); pass a checkpoint-<step> "
            "folder or 'latest'."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    total_limit: int | None = None,
    ema_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Saves the training state at `step` and keeps at most `total_limit` checkpoints (oldest removed first).
    `ema_weights` maps parameter names to EMA tensors (DTensor shards under FSDP). Every process calls this; the main
    process writes the trainer state, renames and prunes."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if ema_weights is not None:
        with quiet_single_process_warning():
            distributed_checkpoint.save(ema_weights, checkpoint_id=temporary / EMA_WEIGHTS_NAME)
    accelerator.wait_for_everyone()  # every process has written its files (RNG states last) before the rename
    if accelerator.is_main_process:
        (temporary / TRAINER_STATE_NAME).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The step and data-stream positions of a checkpoint (`trainer_state.json`)."""
    return json.loads((checkpoint / TRAINER_STATE_NAME).read_text())


def load_checkpoint(
    accelerator: Accelerator, checkpoint: Path, ema_weights: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Restores everything `save_checkpoint` saved, the EMA weights into the tensors of `ema_weights`; returns the
    trainer state (with its `step`)."""
    written_by_fsdp = any(path.name.startswith(FSDP_MODEL_NAME) for path in checkpoint.iterdir())
    if written_by_fsdp != (accelerator.distributed_type == DistributedType.FSDP):
        written, now = ("an FSDP", "without FSDP") if written_by_fsdp else ("a non-FSDP", "under FSDP")
        raise ValueError(
            f"{checkpoint} was written by {written} run and cannot be resumed {now}: resume it as it was launched "
            "(FSDP checkpoints resume under FSDP on any number of processes, others without FSDP)."
        )
    if ema_weights is not None and not (checkpoint / EMA_WEIGHTS_NAME).is_dir():
        raise ValueError(
            f"{checkpoint} holds no EMA weights ({EMA_WEIGHTS_NAME}/): it was written with use_ema false, or by a "
            "version of the trainer that kept them elsewhere."
        )
    accelerator.load_state(str(checkpoint))
    if ema_weights is not None:
        with quiet_single_process_warning():
            distributed_checkpoint.load(ema_weights, checkpoint_id=checkpoint / EMA_WEIGHTS_NAME)
    return read_trainer_state(checkpoint)


@contextlib.contextmanager
def quiet_single_process_warning():
    """torch.distributed.checkpoint warns when it runs in a single process, which is what a single-process run
    wants."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
