"""Stage 1: the FlexTok tokenizer (encoder, FSQ, rectified-flow decoder) on a frozen VAE."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ..configuration_flextok import FlexTokConfig
from ..modeling_flextok import FlexTokModel, FlexTokREPAProjector
from .config import TrainingConfig, check_model_settings
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
    # At each logging step, the flow loss with true / shuffled tokens / null condition on this many training images
    # (`token_dependence`): does the decoder read the tokens? 0 turns it off.
    token_dependence_images: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.token_dependence_images == 1 or self.token_dependence_images < 0:
            raise ValueError(
                f"token_dependence_images must be 0 (off) or at least 2 (tokens are shuffled among them), got "
                f"{self.token_dependence_images}."
            )
        if self.freeze_encoder and self.freeze_decoder:
            raise ValueError("freeze_encoder and freeze_decoder together leave nothing to train.")


# Settings of the training objective, not of the trained weights' shapes: a pretrained model takes them in `model`.
# The REPA ones add a new projector to a checkpoint that has none.
FINE_TUNING_SETTINGS = {"nested_dropout_mode", "null_condition_prob", "repa_loss_weight"}
REPA_PROJECTOR_SETTINGS = {
    "repa_layer",
    "repa_feature_size",
    "repa_projector_hidden_size",
    "repa_projector_num_layers",
    "repa_projector_input_norm",
}


def build_tokenizer(config: TokenizerTrainingConfig) -> tuple[FlexTokModel, FrozenVisionFeatures | None]:
    """The model to train (VAE frozen, optional encoder/decoder freezing) and the REPA feature extractor, if any.

    Without `repa_model_name_or_path` no REPA projector trains: a new model is built without one, a pretrained
    model's is kept frozen (and exported unchanged).
    """
    vision = (
        FrozenVisionFeatures.from_pretrained(config.repa_model_name_or_path) if config.repa_model_name_or_path else None
    )
    if config.pretrained_model_name_or_path:
        if config.vae_name_or_path:
            raise ValueError(
                "A pretrained tokenizer brings its own VAE; vae_name_or_path is for new models (set it to null, or "
                "start from training/configs/tokenizer_finetune.yaml)."
            )
        model = pretrained_tokenizer(config, vision)
    else:
        check_model_settings(config.model, {f.name for f in dataclasses.fields(FlexTokConfig)}, "FlexTokConfig")
        settings = dict(config.model)
        vae = AutoencoderKL.from_pretrained(config.vae_name_or_path) if config.vae_name_or_path else None
        if vae is not None:
            settings["vae_config"] = dict(vae.config)
        if vision is None:
            settings.pop("repa_layer", None)
        elif settings.get("repa_layer") is not None:
            settings.setdefault("repa_feature_size", vision.feature_size)
        model = FlexTokModel(FlexTokConfig(**settings))
        if vae is not None:
            model.vae.load_state_dict(vae.state_dict())
    if vision is not None and model.repa_projector is None:
        raise ValueError(
            "repa_model_name_or_path needs a model with a REPA projector: set model.repa_layer (the decoder block "
            "to align; the released checkpoints were trained aligning block 1)."
        )
    if vision is not None and vision.feature_size != model.config.repa_feature_size:
        raise ValueError(
            f"The REPA encoder's features have size {vision.feature_size} but the model's projector outputs "
            f"{model.config.repa_feature_size} (config.repa_feature_size)."
        )
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.vae.requires_grad_(False)
    model.encoder.requires_grad_(not config.freeze_encoder)
    model.decoder.requires_grad_(not config.freeze_decoder)
    if model.repa_projector is not None:
        model.repa_projector.requires_grad_(vision is not None)
    return model.train(), vision


def pretrained_tokenizer(config: TokenizerTrainingConfig, vision: FrozenVisionFeatures | None) -> FlexTokModel:
    """`pretrained_model_name_or_path` with the fine-tuning settings of `config.model` applied."""
    check_model_settings(config.model, FINE_TUNING_SETTINGS | REPA_PROJECTOR_SETTINGS, "a pretrained tokenizer")
    model = FlexTokModel.from_pretrained(config.pretrained_model_name_or_path)
    for name in FINE_TUNING_SETTINGS & set(config.model):
        setattr(model.config, name, config.model[name])
    projector_settings = {name: config.model[name] for name in REPA_PROJECTOR_SETTINGS & set(config.model)}
    if model.repa_projector is not None:
        differing = {k: v for k, v in projector_settings.items() if getattr(model.config, k) != v}
        if differing:
            own = {name: getattr(model.config, name) for name in differing}
            raise ValueError(
                f"{config.pretrained_model_name_or_path} has its own REPA projector ({own}), which fine-tuning keeps; "
                f"model asks for {differing}."
            )
    elif projector_settings.get("repa_layer") is not None and vision is not None:
        projector_settings.setdefault("repa_feature_size", vision.feature_size)
        for name, value in projector_settings.items():
            setattr(model.config, name, value)
        model.config.validate_architecture()
        model.repa_projector = FlexTokREPAProjector(model.config)
        model.repa_projector.apply(model._init_weights)
    return model


def tokenizer_loss_function(vision: FrozenVisionFeatures | None, accelerator: Accelerator):
    """`(model, batch) -> (loss, logs)` for [`~flextok_hf.training.train`]; the REPA encoder moves to the
    accelerator's device and runs in its mixed precision (it is outside the prepared model, which autocast wraps)."""
    device = accelerator.device
    vision = vision.to(device) if vision is not None else None

    def compute_loss(model, batch):
        images = batch["pixel_values"].to(device, non_blocking=True)
        repa_target_features = None
        if vision is not None:
            with torch.no_grad(), accelerator.autocast():
                repa_target_features = vision(images)
        output = model(pixel_values=images, repa_target_features=repa_target_features)
        logs = {"flow_loss": output.flow_loss.detach()}
        if output.repa_loss is not None:
            logs["repa_loss"] = output.repa_loss.detach()
        return output.loss, logs

    return compute_loss


@torch.no_grad()
def token_dependence(model: FlexTokModel, latents: torch.Tensor, num_draws: int = 4, seed: int = 0) -> dict[str, float]:
    """Does the decoder read the tokens? Its flow loss on `latents` `[B, C, H/f, W/f]` (scaled VAE latents of B >= 2
    different images) with each image's own tokens, with the tokens of the next image in the batch, and with the null
    condition, all three on the same noise and noise levels: `num_draws` logit-normal draws per image from `seed`, so
    no global random state is touched. A decoder that ignores its condition gives three equal losses; one that reads
    the tokens gives a true-token loss clearly below the shuffled-token loss.

    Returns:
        `{"flow_loss_true_tokens", "flow_loss_shuffled_tokens", "flow_loss_null_condition"}` (floats).
    """
    if latents.ndim != 4 or len(latents) < 2:
        raise ValueError(f"latents must be [B, C, H, W] with B >= 2 images to shuffle, got {tuple(latents.shape)}.")
    latents = latents.to(model.device, torch.float32)
    codes, _ = model.quantizer(model.encoder(latents))
    conditions = {
        "true_tokens": (codes, False),
        "shuffled_tokens": (codes.roll(1, dims=0), False),
        "null_condition": (codes, True),
    }
    generator = torch.Generator().manual_seed(seed)
    latents = latents.repeat(num_draws, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    sigmas = torch.sigmoid(torch.randn(len(latents), generator=generator)).to(latents)
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy_latents = sigma * noise + (1 - sigma) * latents
    losses = {}
    for name, (condition, is_null) in conditions.items():
        null_condition_mask = torch.full((len(latents),), is_null, device=latents.device)
        velocity = model.decoder(noisy_latents, sigmas, condition.repeat(num_draws, 1, 1), None, null_condition_mask)
        losses[f"flow_loss_{name}"] = F.mse_loss(velocity.float(), noise - latents).item()
    return losses


def token_dependence_evaluation(images: torch.Tensor, num_draws: int = 4, seed: int = 0):
    """`model -> logs` for [`~flextok_hf.training.train`]'s `evaluate`: [`token_dependence`] on `images`
    `[B, 3, H, W]` in [-1, 1] (B >= 2), on fixed noise, so that successive entries differ only by the weights."""
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"token dependence needs at least 2 images [B, 3, H, W], got {tuple(images.shape)}.")

    def evaluate(model: FlexTokModel) -> dict[str, float]:
        with torch.no_grad():
            latents = model.encode_latents(images)
        return token_dependence(model, latents, num_draws, seed)

    return evaluate
