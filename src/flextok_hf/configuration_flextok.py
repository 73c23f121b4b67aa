"""FlexTok tokenizer configuration."""

import copy
import math
from dataclasses import field
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils.type_validators import interval, probability

# The SD-style VAE of the released models (EPFL-VILAB/flextok_vae_c16), as a diffusers AutoencoderKL config.
DEFAULT_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.8,
}

REGISTER_STEPS = ("position_embedding", "nested_dropout", "null_condition")
AttentionMask = Literal["full", "causal", "causal_last"]


@strict
class FlexTokConfig(PreTrainedConfig):
    r"""
    Configuration of [`FlexTokModel`]: VAE, ViT encoder with register tokens, FSQ quantiser and rectified-flow
    decoder. The defaults build the released `flextok_d18_d28` model at 256x256 pixels.

    Args:
        vae_config (`dict`): diffusers `AutoencoderKL` config of the (frozen) VAE.
        vae_scaling_factor (`float`, *optional*): latents are `scaling_factor * posterior mean`; defaults to the
            VAE config's own `scaling_factor`.
        vae_sample_posterior (`bool`): sample the VAE posterior instead of taking its mean when encoding.
        image_size (`int`): default image height and width in pixels for decoding.
        patch_size (`int`): side of the square patches taken from the VAE latent grid (encoder and decoder).
        max_grid_size (`int`): side of the largest patch grid; the fixed 2D sin-cos position tables have this size.
        num_registers (`int`): number of register tokens, i.e. the longest token sequence.
        fsq_levels (`list[int]`): FSQ levels per code dimension; the vocabulary has `prod(fsq_levels)` ids.
        encoder_hidden_size, encoder_num_layers, encoder_head_dim, encoder_mlp_ratio: encoder transformer shape.
        encoder_attention_mask (`str`): "causal_last" (patches see patches; register i sees every patch and
            registers 0..i), "full" or "causal".
        decoder_hidden_size, decoder_num_layers, decoder_head_dim, decoder_mlp_ratio: decoder transformer shape.
        decoder_attention_mask (`str`): as `encoder_attention_mask`, for the decoder.
        decoder_adaln_per_subsequence (`bool`): separate adaLN modulations for the patches and the registers.
        decoder_register_steps (`list[str]`): the order in which the decoder applies the register position
            embedding, the nested-dropout mask token and the null condition to the embedded tokens.
        qk_norm (`bool`): LayerNorm over the head dimension of queries and keys.
        time_embedding_dim (`int`): size of the sinusoidal time features fed to the time MLP.
        max_timestep (`float`): largest time step the decoder is conditioned on (time runs over [0, max_timestep]).
        nested_dropout_mode (`str`): how training samples the number of kept registers: "uniform" over 1..K,
            "pow2" (powers of two) or "uniform_pow2" (uniform, rounded up to a power of two).
        null_condition_prob (`float`): training probability of replacing all registers of an image by the null
            condition (for classifier-free guidance).
        initializer_range (`float`): std of the truncated-normal init of learned tokens and embeddings.
        repa_layer (`int`, *optional*): index of the decoder block whose patch outputs REPA aligns with a frozen
            vision encoder's features in training; `None` (default) builds no REPA projector.
        repa_feature_size (`int`): feature size of that vision encoder (e.g. 768 for DINOv2-B).
        repa_projector_hidden_size (`int`): hidden width of the REPA projection MLP.
        repa_projector_num_layers (`int`): linear layers of that MLP (SiLU between them), at least 2.
        repa_projector_input_norm (`bool`): an affine-free LayerNorm before the MLP (the reference's `MLPHead`
            default, kept when a released REPA head is loaded).
        repa_loss_weight (`float`): weight of the REPA loss in the training loss.
    """

    model_type = "flextok"

    vae_config: dict | None = None
    vae_scaling_factor: int | float | None = None
    vae_sample_posterior: bool = False
    image_size: int = interval(min=1)(default=256)
    patch_size: int = interval(min=1)(default=2)
    max_grid_size: int = interval(min=1)(default=16)
    num_registers: int = interval(min=1)(default=256)
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])
    encoder_hidden_size: int = interval(min=4)(default=1152)
    encoder_num_layers: int = interval(min=1)(default=18)
    encoder_head_dim: int = interval(min=1)(default=64)
    encoder_mlp_ratio: int | float = interval(min=0, exclude_min=True)(default=4.0)
    encoder_attention_mask: AttentionMask = "causal_last"
    decoder_hidden_size: int = interval(min=4)(default=1792)
    decoder_num_layers: int = interval(min=1)(default=28)
    decoder_head_dim: int = interval(min=1)(default=64)
    decoder_mlp_ratio: int | float = interval(min=0, exclude_min=True)(default=4.0)
    decoder_attention_mask: AttentionMask = "full"
    decoder_adaln_per_subsequence: bool = True
    decoder_register_steps: list[str] = field(default_factory=lambda: list(REGISTER_STEPS))
    qk_norm: bool = True
    time_embedding_dim: int = interval(min=1)(default=256)
    max_timestep: int | float = interval(min=0, exclude_min=True)(default=1.0)
    nested_dropout_mode: Literal["uniform", "pow2", "uniform_pow2"] = "pow2"
    null_condition_prob: int | float = probability(default=0.2)
    initializer_range: int | float = interval(min=0)(default=0.02)
    repa_layer: int | None = None
    repa_feature_size: int = interval(min=1)(default=768)
    repa_projector_hidden_size: int = interval(min=1)(default=2048)
    repa_projector_num_layers: int = interval(min=2)(default=3)
    repa_projector_input_norm: bool = False
    repa_loss_weight: int | float = interval(min=0)(default=1.0)

    def __post_init__(self, **kwargs):
        # A deep copy: the default's nested lists (block_out_channels, ...) must not be shared between configs.
        self.vae_config = copy.deepcopy(self.vae_config if self.vae_config is not None else DEFAULT_VAE_CONFIG)
        if self.vae_scaling_factor is None:
            self.vae_scaling_factor = float(self.vae_config.get("scaling_factor", 1.0))
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Cross-field checks, run by `@strict` after the per-field type and range checks."""
        if self.repa_layer is not None and not 0 <= self.repa_layer < self.decoder_num_layers:
            raise ValueError(
                f"repa_layer must index a decoder block in [0, {self.decoder_num_layers}), got {self.repa_layer}."
            )
        for key in ("latent_channels", "block_out_channels"):
            if key not in self.vae_config:
                raise ValueError(f"vae_config must be a diffusers AutoencoderKL config with {key!r}.")
        if not self.fsq_levels or min(self.fsq_levels) < 2:
            raise ValueError(f"fsq_levels must be a non-empty list of integers >= 2, got {self.fsq_levels}.")
        if sorted(self.decoder_register_steps) != sorted(REGISTER_STEPS):
            raise ValueError(
                f"decoder_register_steps must order exactly {REGISTER_STEPS}, got {self.decoder_register_steps}."
            )
        for part in ("encoder", "decoder"):
            hidden, head = getattr(self, f"{part}_hidden_size"), getattr(self, f"{part}_head_dim")
            if hidden % head != 0 or hidden % 4 != 0:
                raise ValueError(
                    f"{part}_hidden_size ({hidden}) must be a multiple of {part}_head_dim ({head}) and of 4."
                )
        largest = self.max_grid_size * self.image_multiple
        if self.image_size % self.image_multiple != 0 or self.image_size > largest:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of {self.image_multiple} and at most {largest} "
                f"(max_grid_size {self.max_grid_size} patches of {self.image_multiple} pixels)."
            )

    @property
    def latent_channels(self) -> int:
        return self.vae_config["latent_channels"]

    @property
    def vae_downsample_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this: VAE downsampling times patch size."""
        return self.vae_downsample_factor * self.patch_size

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size
