"""Convert a FlexTok checkpoint in the reference's released format (apple/ml-flextok, EPFL-VILAB/flextok_*) to ours.

    flextok-hf convert EPFL-VILAB/flextok_d18_d28_dfn ./flextok_d18_d28_dfn [--vae-config PATH] [--push-to-hub REPO]

The format itself is read by `loading_reference`; this module writes the result.
"""

import os
import shutil
import tempfile
from pathlib import Path

from .modeling_flextok import FlexTokModel


def save_pretrained_atomic(model, output_dir, **save_kwargs):
    """`model.save_pretrained` into a temporary folder beside `output_dir`, then swapped into place, so an
    interrupted save never leaves a half-written checkpoint."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, **save_kwargs)
        previous = None
        if output_dir.exists():
            previous = output_dir.with_name(f".{output_dir.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(output_dir, previous)
        os.replace(staging, output_dir)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_checkpoint(source, output_dir, vae_config=None, push_to_hub: str | None = None):
    """Loads `source` (a released-format folder, `.safetensors` file or Hub repo id), writes it to `output_dir`
    in our format (config.json, model.safetensors, README.md) and optionally pushes it to the Hub repo
    `push_to_hub`. Returns the model."""
    model = FlexTokModel.from_pretrained(source, vae_config=vae_config)
    save_pretrained_atomic(model, output_dir)
    if push_to_hub:
        model.push_to_hub(push_to_hub)
    return model
