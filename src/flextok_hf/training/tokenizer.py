"""Stage 1: the FlexTok tokenizer (encoder, FSQ, rectified-flow decoder) on a frozen VAE."""

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL

from ..configuration_flextok import FlexTokConfig
from ..modeling_flextok import FlexTokModel
from .config import TrainingConfig
from .losses import FrozenVisionFeatures


@dataclass
class TokenizerTrainingConfig(TrainingConfig):
    """Train or fine-tune a FlexTok tokenizer (rectified-flow loss, nested dropout, REPA).

    `model` holds `FlexTokConfig` arguments for a model trained from scratch; `pretrained_model_name_or_path`
    starts from a checkpoint instead (our format or the released one). `vae_name_or_path` swaps in a trained
    diffusers `AutoencoderKL` (e.g. from `train_vae.py`). `repa_model_name_or_path` names the frozen vision encoder
    (a transformers `AutoModel`, e.g. facebook/dinov2-base) whose features the decoder block
    `model.repa_layer` is aligned with.
    """

    model: dict[str, Any] = field(default_factory=dict)
    pretrained_model_name_or_path: str | None = None
    vae_name_or_path: str | None = None
    freeze_encoder: bool = False
    freeze_decoder: bool = False
    repa_model_name_or_path: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.freeze_encoder and self.freeze_decoder:
            raise ValueError("freeze_encoder and freeze_decoder together leave nothing to train.")


def build_tokenizer(config: TokenizerTrainingConfig) -> tuple[FlexTokModel, FrozenVisionFeatures | None]:
    """The model to train (VAE frozen, optional encoder/decoder freezing) and the REPA feature extractor, if any."""
    vision = (
        FrozenVisionFeatures.from_pretrained(config.repa_model_name_or_path) if config.repa_model_name_or_path else None
    )
    vae = AutoencoderKL.from_pretrained(config.vae_name_or_path) if config.vae_name_or_path else None
    if config.pretrained_model_name_or_path:
        model = FlexTokModel.from_pretrained(config.pretrained_model_name_or_path)
        if config.model:
            raise ValueError("Set either model (a new architecture) or pretrained_model_name_or_path, not both.")
        if vae is not None:
            raise ValueError("A pretrained tokenizer brings its own VAE; vae_name_or_path is for new models.")
    else:
        settings = dict(config.model)
        if vae is not None:
            settings["vae_config"] = dict(vae.config)
        if vision is not None and settings.get("repa_layer") is not None:
            settings.setdefault("repa_feature_size", vision.feature_size)
        model = FlexTokModel(FlexTokConfig(**settings))
        if vae is not None:
            model.vae.load_state_dict(vae.state_dict())
    if vision is not None and model.repa_projector is None:
        raise ValueError("repa_model_name_or_path needs a model with a REPA projector: set model.repa_layer.")
    if vision is not None and vision.feature_size != model.config.repa_feature_size:
        raise ValueError(
            f"The REPA encoder's features have size {vision.feature_size} but the model's projector outputs "
            f"{model.config.repa_feature_size} (config.repa_feature_size)."
        )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.vae.requires_grad_(False)
    model.encoder.requires_grad_(not config.freeze_encoder)
    model.decoder.requires_grad_(not config.freeze_decoder)
    return model.train(), vision


def tokenizer_loss_function(vision: FrozenVisionFeatures | None, device: torch.device):
    """`(model, batch) -> (loss, logs)` for [`~flextok_hf.training.train`]; the REPA encoder moves to `device`."""
    vision = vision.to(device) if vision is not None else None

    def compute_loss(model, batch):
        images = batch["pixel_values"].to(device, non_blocking=True)
        repa_target_features = None
        if vision is not None:
            with torch.no_grad():
                repa_target_features = vision(images)
        output = model(pixel_values=images, repa_target_features=repa_target_features)
        logs = {"flow_loss": output.flow_loss.detach()}
        if output.repa_loss is not None:
            logs["repa_loss"] = output.repa_loss.detach()
        return output.loss, logs

    return compute_loss
