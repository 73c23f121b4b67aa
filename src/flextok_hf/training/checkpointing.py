"""Resumable training checkpoints, written so that a killed run never leaves one that `latest` would pick.

A checkpoint is `output_dir/checkpoint-<step>/`: accelerate's `save_state` (model, optimizer, LR scheduler, EMA and
every registered object, RNG states) plus `trainer_state.json` (step, data-stream position). It is written under a
temporary name and renamed when complete; a rename within one file system is atomic.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


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
) -> Path:
    """Saves the training state at `step` and keeps at most `total_limit` checkpoints (oldest removed first).
    Every process calls this; the main process writes the trainer state, renames and prunes."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        (temporary / TRAINER_STATE_NAME).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restores everything `save_checkpoint` saved; returns the trainer state (with its `step`)."""
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
