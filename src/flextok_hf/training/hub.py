"""Exporting trained models: `save_pretrained`, a model card that says how they were trained, and the Hub."""

from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import create_repo, upload_folder
from torch import nn

from ..hub_utils import create_model_card
from ..modeling_flextok import FlexTokModel
from .config import TrainingConfig


def training_summary(config: TrainingConfig, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """What a model card reports of a run."""
    return {
        "data": config.train_data or getattr(config, "token_data", None),
        "steps": config.max_train_steps,
        "global_batch_per_process": config.train_batch_size * config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "mixed_precision": config.mixed_precision,
        "ema": config.ema_decay if config.use_ema else None,
        **({"final_metrics": metrics} if metrics else {}),
    }


def export_model(model: nn.Module, folder: Path, config: TrainingConfig, metrics: dict[str, float] | None = None):
    """`save_pretrained` into `folder` with a model card; pushed to `config.hub_model_id` with `push_to_hub`."""
    model.save_pretrained(folder)
    base_model = getattr(config, "pretrained_model_name_or_path", None)
    card = create_model_card(model, base_model=base_model, training=training_summary(config, metrics))
    card.save(folder / "README.md")
    push_folder(folder, config)


def export_generator(model: nn.Module, folder: Path, config, metrics: dict[str, float] | None = None):
    """The AR generator alone, or with `config.export_pipeline` a whole `FlexTokPipeline` around it."""
    if not config.export_pipeline:
        return export_model(model, folder, config, metrics)
    from ..pipelines.pipeline_flextok import FlexTokPipeline

    components = {}
    if model.config.is_text_conditional:
        from transformers import AutoModel, AutoTokenizer

        components["text_encoder"] = AutoModel.from_pretrained(config.text_encoder_name_or_path)
        components["tokenizer"] = AutoTokenizer.from_pretrained(config.text_encoder_name_or_path)
    pipeline = FlexTokPipeline(
        ar_model=model,
        flextok=FlexTokModel.from_pretrained(config.tokenizer_name_or_path),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        **components,
    )
    pipeline.save_pretrained(folder)
    card = create_model_card(
        pipeline, base_model=config.tokenizer_name_or_path, training=training_summary(config, metrics)
    )
    card.save(folder / "README.md")
    push_folder(folder, config)


def push_folder(folder: Path, config: TrainingConfig):
    if not config.push_to_hub:
        return
    repo_id = create_repo(config.hub_model_id, private=config.hub_private, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Training run, {config.max_train_steps} steps")
