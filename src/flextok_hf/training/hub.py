"""Exporting trained models: `save_pretrained`, a model card that says how they were trained, and the Hub."""

from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import HfApi
from torch import nn

from ..hub_utils import create_model_card, upload_saved_folder
from ..modeling_flextok import FlexTokModel
from .config import TrainingConfig


def write_training_card(model, folder: Path, config: TrainingConfig, metrics: dict[str, float] | None):
    """Replaces the card `save_pretrained` wrote with one that also says how the model was trained."""
    card = create_model_card(
        model,
        config.hub_model_id,
        base_model=getattr(config, "pretrained_model_name_or_path", None),
        datasets=[data] if (data := config.train_data or getattr(config, "token_data", None)) else None,
        training_steps=config.max_train_steps,
        metrics=metrics,
    )
    card.save(folder / "README.md")


def export_model(model: nn.Module, folder: Path, config: TrainingConfig, metrics: dict[str, float] | None = None):
    """`save_pretrained` into `folder`, with a model card that says how it was trained."""
    model.save_pretrained(folder)
    write_training_card(model, folder, config, metrics)


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
    write_training_card(pipeline, folder, config, metrics)


def create_hub_repo(config: TrainingConfig):
    """Creates `config.hub_model_id` (if new) before training, so that a missing login or a bad name stops the run
    at its start rather than after its last step."""
    try:
        HfApi().create_repo(config.hub_model_id, private=config.hub_private, exist_ok=True)
    except Exception as error:
        raise RuntimeError(
            f"push_to_hub: cannot create or reach the Hub repo {config.hub_model_id!r} ({error}). Log in with "
            "`hf auth login` (or set HF_TOKEN), or train without --push_to_hub and upload the model folder later."
        ) from error


def push_folder(folder: Path, config: TrainingConfig):
    """Uploads the exported `folder` to `config.hub_model_id`; on failure the error names the folder, which stays."""
    try:
        upload_saved_folder(
            folder,
            config.hub_model_id,
            private=config.hub_private,
            commit_message=f"Training run, {config.max_train_steps} steps",
        )
    except Exception as error:
        raise RuntimeError(
            f"The trained model is saved in {folder}, but its upload to {config.hub_model_id!r} failed ({error}). "
            f"Upload it with `hf upload {config.hub_model_id} {folder}`."
        ) from error
