"""Training configurations: one dataclass per stage, filled from a YAML file and `--key value` overrides."""

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TrainingConfig:
    """What every training script shares: data, optimisation, precision, checkpoints, logging and export.

    Batch sizes are per process; the global batch is `train_batch_size * gradient_accumulation_steps * processes`.
    """

    output_dir: str = "outputs/run"
    seed: int = 0
    # Data: a folder of images, a glob of webdataset .tar shards or .parquet files, or a Hub dataset name.
    train_data: str | None = None
    dataset_split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    resolution: int = 256
    random_crop: bool = False
    random_flip: bool = True
    min_image_size: int = 0
    shuffle_buffer_size: int = 0
    dataloader_num_workers: int = 0
    # Writes the key of every example trained on to output_dir/example_keys_stream<i>.txt, one file per data stream
    # (one stream per process of the run's first launch): an audit of the data.
    record_example_keys: bool = False
    # Optimisation.
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_weight_decay: float = 0.05
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # Speed and memory. mixed_precision null: what `accelerate launch` says (its --mixed_precision or config file),
    # else "no".
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    # What `compile` compiles: "model", the whole forward as one graph, or "blocks", each transformer block on its
    # own (the model's `_repeated_blocks`; the rest runs eagerly), which compiles several times faster.
    compile_scope: str = "model"
    allow_tf32: bool = False  # TF32 matmuls on Ampere and later GPUs, for what runs in float32
    cpu: bool = False
    # Exponential moving average of the weights; the EMA weights are what gets exported.
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    # Checkpoints, logging, export.
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None
    logging_steps: int = 10
    # How often the stage's evaluation (the tokenizer's token-dependence probe) runs, a multiple of logging_steps;
    # null: at every logging step.
    evaluation_steps: int | None = None
    report_to: str | None = "tensorboard"
    tracker_project_name: str = "flextok-hf"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def __post_init__(self):
        positive = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "checkpointing_steps",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.evaluation_steps is not None and (
            self.evaluation_steps < 1 or self.evaluation_steps % self.logging_steps
        ):
            raise ValueError(
                f"evaluation_steps must be a multiple of logging_steps ({self.logging_steps}), got "
                f"{self.evaluation_steps}."
            )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(
                f"checkpoints_total_limit must be at least 1 (or null: keep all), got {self.checkpoints_total_limit}."
            )
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16', 'bf16' or null, got {self.mixed_precision!r}.")
        if self.compile_scope not in ("model", "blocks"):
            raise ValueError(f"compile_scope must be 'model' or 'blocks', got {self.compile_scope!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/flextok-d12-d12').")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_config(config_class: type[TrainingConfig], argv: list[str] | None = None) -> TrainingConfig:
    """`--config file.yaml` then any `--key value` (or `--key=value`) overrides, values parsed as YAML
    (`--compile true`, `--model '{decoder_num_layers: 6}'`); a true/false setting given alone (`--compile`) is set
    true. Unknown keys are an error that lists the valid ones."""
    field_types = {f.name: f.type for f in dataclasses.fields(config_class)}
    parser = argparse.ArgumentParser(
        description=config_class.__doc__.split("\n")[0],
        epilog=f"Settings (YAML keys, or --key value to override): {', '.join(field_types)}.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with the run's settings")
    args, overrides = parser.parse_known_args(argv)
    values = yaml.safe_load(args.config.read_text()) if args.config else {}
    if not isinstance(values, dict):
        raise ValueError(f"{args.config} must hold a mapping of settings, got {type(values).__name__}.")
    values = dict(values)
    tokens = [part for token in overrides for part in (token.split("=", 1) if token.startswith("--") else [token])]
    while tokens:
        key = tokens.pop(0)
        if not key.startswith("--"):
            parser.error(f"expected an option '--key', got {key!r}")
        name = key[2:].replace("-", "_")
        if not tokens or tokens[0].startswith("--"):
            if bool not in allowed_types(field_types.get(name)):
                parser.error(f"{key} needs a value")
            tokens.insert(0, "true")
        value = tokens.pop(0)
        # Text settings stay text (YAML would read `--mixed_precision no` as False); `null` still means None.
        is_text = str in allowed_types(field_types.get(name)) and value not in ("null", "~")
        values[name] = value if is_text else yaml.safe_load(value)
    unknown = sorted(set(values) - set(field_types))
    if unknown:
        raise ValueError(f"Unknown settings {unknown}; {config_class.__name__} takes {sorted(field_types)}.")
    return config_class(**{name: checked_value(name, value, field_types[name]) for name, value in values.items()})


def check_model_settings(settings: dict[str, Any], accepted: set[str], what: str):
    """Refuses `model` settings that `what` does not take (a misspelt size would otherwise be dropped silently)."""
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ValueError(f"Unknown model settings {unknown}; {what} takes {sorted(accepted)}.")


def allowed_types(annotation: Any) -> tuple[type, ...]:
    """`int | None` -> `(int, NoneType)`, `dict[str, Any]` -> `(dict,)`."""
    if annotation is None:
        return ()
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return tuple(typing.get_origin(t) or t for t in (typing.get_args(annotation) if is_union else (annotation,)))


def checked_value(name: str, value: Any, annotation: Any) -> Any:
    """`value` as the field's type: numbers written as strings are converted (YAML reads `2e-4` as a string),
    anything else of the wrong type is an error naming the setting."""
    allowed = allowed_types(annotation)
    if isinstance(value, str) and str not in allowed:
        for number in (int, float):
            if number in allowed:
                try:
                    return number(value)
                except ValueError:
                    pass
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"Setting {name} must be {expected}, got {value!r}.")
    return value


def save_config(config: TrainingConfig, path: Path):
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
