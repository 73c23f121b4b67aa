"""FlexTok tokenizer configuration."""

import math

from transformers import PretrainedConfig

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
ATTENTION_MASKS = ("full", "causal", "causal_last")
NESTED_DROPOUT_MODES = ("uniform", "pow2", "uniform_pow2")


class FlexTokConfig(PretrainedConfig):
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
        repa_loss_weight (`float`): weight of the REPA loss in the training loss.
    """

    model_type = "flextok"

    def __init__(
        self,
        vae_config: dict | None = None,
        vae_scaling_factor: float | None = None,
        vae_sample_posterior: bool = False,
        image_size: int = 256,
        patch_size: int = 2,
        max_grid_size: int = 16,
        num_registers: int = 256,
        fsq_levels: list[int] = (8, 8, 8, 5, 5, 5),
        encoder_hidden_size: int = 1152,
        encoder_num_layers: int = 18,
        encoder_head_dim: int = 64,
        encoder_mlp_ratio: float = 4.0,
        encoder_attention_mask: str = "causal_last",
        decoder_hidden_size: int = 1792,
        decoder_num_layers: int = 28,
        decoder_head_dim: int = 64,
        decoder_mlp_ratio: float = 4.0,
        decoder_attention_mask: str = "full",
        decoder_adaln_per_subsequence: bool = True,
        decoder_register_steps: list[str] = REGISTER_STEPS,
        qk_norm: bool = True,
        time_embedding_dim: int = 256,
        max_timestep: float = 1.0,
        nested_dropout_mode: str = "pow2",
        null_condition_prob: float = 0.2,
        initializer_range: float = 0.02,
        repa_layer: int | None = None,
        repa_feature_size: int = 768,
        repa_projector_hidden_size: int = 2048,
        repa_loss_weight: float = 1.0,
        **kwargs,
    ):
        self.vae_config = dict(vae_config if vae_config is not None else DEFAULT_VAE_CONFIG)
        self.vae_scaling_factor = float(
            vae_scaling_factor if vae_scaling_factor is not None else self.vae_config.get("scaling_factor", 1.0)
        )
        self.vae_sample_posterior = vae_sample_posterior
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_grid_size = max_grid_size
        self.num_registers = num_registers
        self.fsq_levels = list(fsq_levels)
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_num_layers = encoder_num_layers
        self.encoder_head_dim = encoder_head_dim
        self.encoder_mlp_ratio = encoder_mlp_ratio
        self.encoder_attention_mask = encoder_attention_mask
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_layers = decoder_num_layers
        self.decoder_head_dim = decoder_head_dim
        self.decoder_mlp_ratio = decoder_mlp_ratio
        self.decoder_attention_mask = decoder_attention_mask
        self.decoder_adaln_per_subsequence = decoder_adaln_per_subsequence
        self.decoder_register_steps = list(decoder_register_steps)
        self.qk_norm = qk_norm
        self.time_embedding_dim = time_embedding_dim
        self.max_timestep = max_timestep
        self.nested_dropout_mode = nested_dropout_mode
        self.null_condition_prob = null_condition_prob
        self.initializer_range = initializer_range
        self.repa_layer = repa_layer
        self.repa_feature_size = repa_feature_size
        self.repa_projector_hidden_size = repa_projector_hidden_size
        self.repa_loss_weight = repa_loss_weight
        super().__init__(**kwargs)
        self._validate()

    def _validate(self):
        for name in ("encoder_attention_mask", "decoder_attention_mask"):
            if getattr(self, name) not in ATTENTION_MASKS:
                raise ValueError(f"{name} must be one of {ATTENTION_MASKS}, got {getattr(self, name)!r}.")
        if sorted(self.decoder_register_steps) != sorted(REGISTER_STEPS):
            raise ValueError(
                f"decoder_register_steps must order exactly {REGISTER_STEPS}, got {self.decoder_register_steps}."
            )
        if self.nested_dropout_mode not in NESTED_DROPOUT_MODES:
            raise ValueError(
                f"nested_dropout_mode must be one of {NESTED_DROPOUT_MODES}, got {self.nested_dropout_mode!r}."
            )
        for part in ("encoder", "decoder"):
            hidden, head = getattr(self, f"{part}_hidden_size"), getattr(self, f"{part}_head_dim")
            if hidden % head != 0 or hidden % 4 != 0:
                raise ValueError(
                    f"{part}_hidden_size ({hidden}) must be a multiple of {part}_head_dim ({head}) and of 4."
                )
        if self.repa_layer is not None and not 0 <= self.repa_layer < self.decoder_num_layers:
            raise ValueError(
                f"repa_layer must index a decoder block in [0, {self.decoder_num_layers}), got {self.repa_layer}."
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
