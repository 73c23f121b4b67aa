"""FlexTok: images -> ordered 1D sequences of 1..K discrete tokens -> images (arXiv 2502.13967).

Data flow: VAE encode -> patches of the latent grid + learned registers -> ViT encoder -> FSQ token ids;
token ids -> FSQ codes -> rectified-flow transformer decoder (adaLN-zero on the time step) -> Euler (or Heun)
sampling with classifier-free or adaptive projected guidance -> VAE decode.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.accelerate_utils import apply_forward_hook
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_flextok import FlexTokConfig
from .hub_utils import ModelCardMixin, StrictLoadingMixin
from .loading_reference import find_checkpoint, load_reference_checkpoint
from .sampling import FlowGuidance, set_flow_timesteps
from .utils import check_generators, is_int

if TYPE_CHECKING:
    from .evaluation.adaptive import AdaptiveTokenizationOutput

# Images may overshoot [-1, 1] a little after resizing; beyond this they are in another range.
IMAGE_RANGE_TOLERANCE = 0.5


@dataclass
class FlexTokEncoderOutput(ModelOutput):
    """
    Args:
        token_ids (`torch.LongTensor` of shape `(batch_size, num_registers)`): FSQ token ids, coarse to fine.
        codes (`torch.FloatTensor` of shape `(batch_size, num_registers, len(fsq_levels))`): quantised codes.
        latents (`torch.FloatTensor` of shape `(batch_size, latent_channels, height / f, width / f)`): scaled VAE
            latents the tokens were computed from.
    """

    token_ids: torch.LongTensor | None = None
    codes: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None


@dataclass
class FlexTokDecoderOutput(ModelOutput):
    """
    Args:
        images (`torch.FloatTensor` `(batch_size, 3, height, width)` in about [-1, 1], `np.ndarray` or PIL list):
            the decoded images, in the format chosen by `output_type`.
        latents (`torch.FloatTensor` of shape `(batch_size, latent_channels, height / f, width / f)`): the sampled
            (scaled) VAE latents.
    """

    images: torch.FloatTensor | np.ndarray | list | None = None
    latents: torch.FloatTensor | None = None


@dataclass
class FlexTokOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): `flow_loss + config.repa_loss_weight * repa_loss` (the flow loss
            alone without REPA).
        flow_loss (`torch.FloatTensor` of shape `()`): rectified-flow MSE between predicted and target velocity.
        repa_loss (`torch.FloatTensor` of shape `()`, *optional*): REPA alignment loss, when target features are given.
        token_ids (`torch.LongTensor` of shape `(batch_size, num_registers)`): token ids of the input images.
        predicted_velocity, target_velocity, noisy_latents (`torch.FloatTensor` of the latent shape): the decoder's
            prediction, its target `noise - latents`, and its input `sigma * noise + (1 - sigma) * latents`.
        sigmas (`torch.FloatTensor` of shape `(batch_size,)`): the noise level (= time step) of each image.
        keep_k (`torch.LongTensor` of shape `(batch_size,)`): registers kept by nested dropout for each image.
    """

    loss: torch.FloatTensor | None = None
    flow_loss: torch.FloatTensor | None = None
    repa_loss: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    predicted_velocity: torch.FloatTensor | None = None
    target_velocity: torch.FloatTensor | None = None
    noisy_latents: torch.FloatTensor | None = None
    sigmas: torch.FloatTensor | None = None
    keep_k: torch.LongTensor | None = None


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm, the only norm FlexTok uses. PyTorch computes its statistics in float32 for bfloat16
    and float16 inputs too, so no float32 copy of the activations is needed."""
    return F.layer_norm(x, x.shape[-1:])


def segment_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, num_patches: int) -> torch.Tensor:
    """`x * scale + shift` over `[B, N, D]` with one `scale`/`shift` `[B, S, D]` per segment: with S = 2 the first
    `num_patches` tokens (the image patches) take segment 0 and the registers after them segment 1. Each segment is
    a contiguous range, so its row broadcasts over it (no per-token gather of the modulation)."""
    parts = x.split([num_patches, x.shape[1] - num_patches], dim=1) if scale.shape[1] == 2 else (x,)
    outputs = [
        part * scale[:, i, None] if shift is None else torch.addcmul(shift[:, i, None], part, scale[:, i, None])
        for i, part in enumerate(parts)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def padded_weight(linear: nn.Linear, rows: int = 0, columns: int = 0) -> torch.Tensor:
    """The weight with `rows` zero output rows and `columns` zero input columns appended."""
    return F.pad(linear.weight, (0, columns, 0, rows))


def build_2d_sincos_table(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed position table `[1, dim, grid, grid]`; entry `[0, :, y, x]` is
    `[sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)]` over `k < dim/4`, `w_k = 10000^(-k/(dim/4))`."""
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows = torch.outer(coords.repeat_interleave(grid_size), omega)
    cols = torch.outer(coords.repeat(grid_size), omega)
    table = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return table.T.reshape(1, dim, grid_size, grid_size)


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, H/p, W/p, p*p*C]`, each patch flattened as (row in patch, column in patch, channel)."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.permute(0, 2, 3, 1).reshape(b, h // p, p, w // p, p, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: `[B, h, w, p*p*C]` -> `[B, C, h*p, w*p]`."""
    b, h, w, _ = patches.shape
    p = patch_size
    x = patches.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * p, w * p)


def embed_patches(
    latents: torch.Tensor, patch_embed: nn.Linear, position_table: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Latents `[B, C, H, W]` -> patch tokens `[B, h*w, D]` (row-major) plus the fixed positions cropped to the
    `h x w` patch grid, and that grid size."""
    dtype = patch_embed.weight.dtype
    patches = patchify(latents.to(dtype), patch_size)
    grid_h, grid_w = patches.shape[1:3]
    positions = position_table[0, :, :grid_h, :grid_w].permute(1, 2, 0).to(dtype)
    return (patch_embed(patches) + positions).flatten(1, 2), (grid_h, grid_w)


def build_attention_mask(mode: str, num_patches: int, num_registers: int, device) -> torch.Tensor | None:
    """Boolean `[N, N]` mask (True = may attend) over one image's `[patches | registers]` sequence.

    "full": no mask. "causal": each token sees tokens at or before it. "causal_last": additionally every token
    sees all patches, so patches see only patches and register i sees every patch and registers 0..i.
    """
    if mode == "full":
        return None
    positions = torch.arange(num_patches + num_registers, device=device)
    mask = positions[None, :] <= positions[:, None]
    if mode == "causal_last":
        mask = mask | (positions[None, :] < num_patches)
    return mask


class FSQuantizer(nn.Module):
    """Finite scalar quantisation (arXiv 2309.15505): each of `len(levels)` dimensions is bounded with tanh and
    rounded to one of `levels[i]` values in [-1, 1]; the digits form one id in `[0, prod(levels))`.
    Stateless: the levels come from the config, so there is nothing to store."""

    def __init__(self, levels: list[int]):
        super().__init__()
        self.levels = list(levels)
        self.codebook_size = math.prod(self.levels)

    def _tables(self, device):
        levels = torch.tensor(self.levels, dtype=torch.int32, device=device)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=device), dim=0)
        return levels, levels // 2, basis

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """`latents` `[..., len(levels)]` -> (codes `[..., len(levels)]` float32 with straight-through
        gradients, token ids `[...]` int64)."""
        levels, half_width, basis = self._tables(latents.device)
        z = latents.float()
        half_range = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_range).atanh()
        bounded = (z + shift).tanh() * half_range - offset
        rounded = bounded + (bounded.round() - bounded).detach()
        codes = rounded / half_width
        digits = (codes.detach() * half_width + half_width).round().long()
        return codes, (digits * basis).sum(dim=-1)

    def indices_to_codes(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """Token ids `[...]` -> codes `[..., len(levels)]` (float32)."""
        levels, half_width, basis = self._tables(token_ids.device)
        digits = (token_ids.unsqueeze(-1) // basis) % levels
        return (digits - half_width) / half_width


class FlexTokAttention(nn.Module):
    """Multi-head self-attention without biases, with QK-norm and the muP scale 8/head_dim of the released
    models (equal to 1/sqrt(head_dim) only at head_dim 64)."""

    def __init__(self, hidden_size: int, head_dim: int, qk_norm: bool):
        super().__init__()
        self.num_heads = hidden_size // head_dim
        self.head_dim = head_dim
        self.qk_norm = qk_norm
        self.scale = 8.0 / head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        # One GEMM for q, k and v (the weights stay separate, as the checkpoints store them).
        qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv = F.linear(hidden_states, qkv_weight).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:
            query, key = layer_norm(query), layer_norm(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FlexTokMLP(nn.Module):
    """Gated SiLU MLP, `down(silu(gate(x)) * up(x))`, hidden size `int(2/3 * int(mlp_ratio * hidden))`."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        intermediate_size = int(2 * int(hidden_size * mlp_ratio) / 3)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        # The products run on a hidden width padded to a multiple of 64: unaligned widths (4778 in the released d28)
        # get slow GEMM kernels. Zero rows and columns change nothing, since silu(0) * 0 = 0, also in training.
        self.padding = -intermediate_size % 64

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate_up_weight = torch.cat(
            [padded_weight(self.gate_proj, rows=self.padding), padded_weight(self.up_proj, rows=self.padding)]
        )
        gate, up = F.linear(hidden_states, gate_up_weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, padded_weight(self.down_proj, columns=self.padding))


class FlexTokBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block of the encoder."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.attn = FlexTokAttention(hidden_size, head_dim, qk_norm)
        self.mlp = FlexTokMLP(hidden_size, mlp_ratio)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(layer_norm(hidden_states), attention_mask)
        return hidden_states + self.mlp(layer_norm(hidden_states))


class FlexTokAdaLNBlock(FlexTokBlock):
    """Decoder block with adaLN-zero modulation by the time embedding. With `num_segments` 2 the patches and
    the registers get separate modulations."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_ratio: float, qk_norm: bool, num_segments: int):
        super().__init__(hidden_size, head_dim, mlp_ratio, qk_norm)
        self.num_segments = num_segments
        self.adaln_modulation = nn.Linear(hidden_size, num_segments * 6 * hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        time_embedding: torch.Tensor,
        num_patches: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `[B, num_patches + K, D]` (patches, then registers), `time_embedding` `[B, D]`."""
        batch, _, dim = hidden_states.shape
        modulation = self.adaln_modulation(F.silu(time_embedding)).view(batch, self.num_segments, 6, dim)
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = modulation.unbind(dim=2)
        attn_input = segment_affine(layer_norm(hidden_states), 1 + scale_msa, shift_msa, num_patches)
        attn_output = self.attn(attn_input, attention_mask)
        hidden_states = hidden_states + segment_affine(attn_output, gate_msa, None, num_patches)
        mlp_input = segment_affine(layer_norm(hidden_states), 1 + scale_mlp, shift_mlp, num_patches)
        return hidden_states + segment_affine(self.mlp(mlp_input), gate_mlp, None, num_patches)


class FlexTokTimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, max_timestep] -> MLP. Written out rather than diffusers'
    `get_timestep_embedding`, which scales after the product and so rounds differently from the released model."""

    def __init__(self, frequency_dim: int, hidden_size: int, max_timestep: float):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_timestep = max_timestep
        self.linear_1 = nn.Linear(frequency_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        exponent = -math.log(256) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
        freqs = (1000.0 / self.max_timestep) * torch.exp(exponent)
        args = timesteps[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        features = F.pad(features, (0, self.frequency_dim % 2)).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class FlexTokEncoder(nn.Module):
    """ViT over 2x2 patches of the VAE latent with `num_registers` learned register tokens appended; the
    register outputs are projected to the FSQ dimension."""

    def __init__(self, config: FlexTokConfig):
        super().__init__()
        dim = config.encoder_hidden_size
        self.config = config
        self.patch_embed = nn.Linear(config.latent_channels * config.patch_size**2, dim)
        self.register_buffer("position_table", build_2d_sincos_table(dim, config.max_grid_size))
        self.registers = nn.Parameter(torch.zeros(config.num_registers, dim))
        self.blocks = nn.ModuleList(
            FlexTokBlock(dim, config.encoder_head_dim, config.encoder_mlp_ratio, config.qk_norm)
            for _ in range(config.encoder_num_layers)
        )
        self.to_latents = nn.Linear(dim, len(config.fsq_levels))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents `[B, C, H/f, W/f]` -> register latents `[B, num_registers, len(fsq_levels)]`."""
        hidden, (grid_h, grid_w) = embed_patches(latents, self.patch_embed, self.position_table, self.config.patch_size)
        hidden = torch.cat([hidden, self.registers.expand(hidden.shape[0], -1, -1)], dim=1)
        num_patches = grid_h * grid_w
        mask = build_attention_mask(
            self.config.encoder_attention_mask, num_patches, self.config.num_registers, hidden.device
        )
        for block in self.blocks:
            hidden = block(hidden, mask)
        return self.to_latents(layer_norm(hidden[:, num_patches:]))


class FlexTokDecoder(nn.Module):
    """Rectified-flow transformer: (noisy latent, time step, register codes) -> velocity.

    The register codes are embedded, then position embedding, nested dropout (registers at or after `keep_k`
    become the learned mask token) and null conditioning (all registers of an image become the learned null
    token) are applied in `config.decoder_register_steps` order. Patches of the noisy latent and registers form
    one sequence per image.
    """

    def __init__(self, config: FlexTokConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.config = config
        patch_dim = config.latent_channels * config.patch_size**2
        self.register_embed = nn.Linear(len(config.fsq_levels), dim)
        self.register_position_embeddings = nn.Parameter(torch.zeros(config.num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.null_condition = nn.Parameter(torch.zeros(dim))
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.register_buffer("position_table", build_2d_sincos_table(dim, config.max_grid_size))
        self.time_embedder = FlexTokTimestepEmbedder(config.time_embedding_dim, dim, config.max_timestep)
        self.num_segments = 2 if config.decoder_adaln_per_subsequence else 1
        self.blocks = nn.ModuleList(
            FlexTokAdaLNBlock(dim, config.decoder_head_dim, config.decoder_mlp_ratio, config.qk_norm, self.num_segments)
            for _ in range(config.decoder_num_layers)
        )
        self.output_adaln_modulation = nn.Linear(dim, 2 * dim)
        self.output_proj = nn.Linear(dim, patch_dim)

    def embed_registers(
        self, codes: torch.Tensor, keep_k: torch.LongTensor, null_condition_mask: torch.BoolTensor
    ) -> torch.Tensor:
        """Codes `[B, K, d]`, keep_k `[B]`, null_condition_mask `[B]` -> register tokens `[B, K, D]`."""
        registers = self.register_embed(codes.to(self.register_embed.weight.dtype))
        kept = torch.arange(registers.shape[1], device=registers.device)[None, :] < keep_k[:, None]
        for step in self.config.decoder_register_steps:
            if step == "position_embedding":
                registers = registers + self.register_position_embeddings[: registers.shape[1]]
            elif step == "nested_dropout":
                registers = torch.where(kept[..., None], registers, self.mask_token)
            else:
                registers = torch.where(null_condition_mask[:, None, None], self.null_condition, registers)
        return registers

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        codes: torch.Tensor,
        keep_k: torch.LongTensor | None = None,
        null_condition_mask: torch.BoolTensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """
        Args:
            noisy_latents (`[B, C, H/f, W/f]`): x_t = t * noise + (1 - t) * latents.
            timesteps (`[B]`): t in [0, max_timestep].
            codes (`[B, K, len(fsq_levels)]`): FSQ codes of the K registers.
            keep_k (`[B]`, *optional*): registers kept per image; the rest become the mask token. Default: all.
            null_condition_mask (`[B]` bool, *optional*): images whose registers are replaced by the null
                condition (the unconditional branch of guidance). Default: none.
            output_hidden_states (`bool`): also return the output of every block, `[B, h*w + K, D]` each.

        Returns:
            `torch.FloatTensor` `[B, C, H/f, W/f]`: the predicted velocity `noise - latents`; with
            `output_hidden_states`, the tuple `(velocity, hidden_states)`.
        """
        batch, num_registers = codes.shape[:2]
        device = noisy_latents.device
        if keep_k is None:
            keep_k = torch.full((batch,), num_registers, device=device)
        if null_condition_mask is None:
            null_condition_mask = torch.zeros(batch, dtype=torch.bool, device=device)
        registers = self.embed_registers(codes, keep_k, null_condition_mask)

        patches, (grid_h, grid_w) = embed_patches(
            noisy_latents, self.patch_embed, self.position_table, self.config.patch_size
        )
        num_patches = grid_h * grid_w
        hidden = torch.cat([patches, registers], dim=1)

        time_embedding = self.time_embedder(timesteps)
        mask = build_attention_mask(self.config.decoder_attention_mask, num_patches, num_registers, device)
        hidden_states = []
        for block in self.blocks:
            hidden = block(hidden, time_embedding, num_patches, mask)
            hidden_states.append(hidden)

        shift, scale = self.output_adaln_modulation(F.silu(time_embedding))[:, None].chunk(2, dim=-1)
        patches = layer_norm(hidden[:, :num_patches]) * (1 + scale) + shift
        patches = self.output_proj(patches).view(batch, grid_h, grid_w, -1)
        velocity = unpatchify(patches, self.config.patch_size, self.config.latent_channels)
        return (velocity, tuple(hidden_states)) if output_hidden_states else velocity


class FlexTokREPAProjector(nn.Module):
    """REPA head (arXiv 2410.06940): an MLP from decoder patch tokens to the feature space of a frozen vision
    encoder, whose features the training loss aligns them with. Used in training only.

    `mlp` (the optional input norm, then linear layers each followed by SiLU) and `out_proj` are laid out as the
    reference's `MLPHead`, so released REPA heads load by name."""

    def __init__(self, config: FlexTokConfig):
        super().__init__()
        hidden_size, projector_size = config.decoder_hidden_size, config.repa_projector_hidden_size
        layers = [nn.LayerNorm(hidden_size, elementwise_affine=False)] if config.repa_projector_input_norm else []
        layers += [nn.Linear(hidden_size, projector_size), nn.SiLU()]
        for _ in range(config.repa_projector_num_layers - 2):
            layers += [nn.Linear(projector_size, projector_size), nn.SiLU()]
        self.mlp = nn.Sequential(*layers)
        self.out_proj = nn.Linear(projector_size, config.repa_feature_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, N, decoder_hidden_size]` -> `[B, N, repa_feature_size]`."""
        return self.out_proj(self.mlp(hidden_states))


def repa_alignment_loss(
    projections: torch.Tensor, target_features: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """`1 - cosine similarity` between projected decoder patch tokens `[B, h*w, F]` (row-major over `grid`) and
    vision-encoder patch features `[B, N, F]` of a square `sqrt(N) x sqrt(N)` grid, bilinearly resized to `grid`
    when the two grids differ. Averaged over patches and images."""
    batch, num_features, feature_size = target_features.shape
    side = math.isqrt(num_features)
    if side * side != num_features:
        raise ValueError(f"repa_target_features must hold a square grid of patch features, got {num_features}.")
    if (side, side) != tuple(grid):
        square = target_features.transpose(1, 2).reshape(batch, feature_size, side, side)
        square = F.interpolate(square.float(), size=grid, mode="bilinear", align_corners=False)
        target_features = square.flatten(2).transpose(1, 2)
    similarity = F.cosine_similarity(projections.float(), target_features.float(), dim=-1)
    return 1 - similarity.mean()


def per_image_noise(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise of `shape` `[B, ...]`, drawn image by image from `generator` (one for all, or a list of
    one per image): an image's noise does not depend on the batch it came in, and a CPU generator gives the
    reference's noise for its seed."""
    generators = check_generators(generator, shape[0])
    return torch.cat([randn_tensor((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators])


class FlexTokPreTrainedModel(ModelCardMixin, StrictLoadingMixin, PreTrainedModel):
    config_class = FlexTokConfig
    base_model_prefix = "flextok"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["FlexTokBlock", "FlexTokAdaLNBlock"]
    _repeated_blocks = ["FlexTokBlock", "FlexTokAdaLNBlock"]
    # Rebuilt when absent: the fixed sin-cos tables; and a REPA projector the config adds starts new (it only trains).
    _keys_to_ignore_on_load_missing = [r"position_table$", r"^repa_projector\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Children are initialised before their parents, so the parent sets the layers that are not xavier.
        # Modules without parameters of their own are skipped by transformers for custom code: no block-level init.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (FlexTokEncoder, FlexTokDecoder)):
            table = build_2d_sincos_table(module.position_table.shape[1], self.config.max_grid_size)
            init.copy_(module.position_table, table)
        if isinstance(module, FlexTokEncoder):
            init.trunc_normal_(module.registers, std=std)
            # Small and random, not zero as in the released configs: with a zero head every image gets the same
            # tokens and the encoder's trunk no gradient, so a decoder trained from scratch learns to ignore its
            # condition. Small keeps the FSQ inputs in tanh's linear range, where codes spread over the middle
            # levels; xavier-sized ones saturate it (docs/training.md).
            init.trunc_normal_(module.to_latents.weight, std=std)
        elif isinstance(module, FlexTokDecoder):
            for token in (module.register_position_embeddings, module.mask_token, module.null_condition):
                init.trunc_normal_(token, std=std)
            # adaLN-zero: every block starts as the identity and the output head predicts zero velocity.
            for linear in [block.adaln_modulation for block in module.blocks] + [module.output_adaln_modulation]:
                init.zeros_(linear.weight)
                init.zeros_(linear.bias)
            init.zeros_(module.output_proj.weight)


class FlexTokModel(FlexTokPreTrainedModel):
    """FlexTok tokenizer: `encode` images to token ids, `decode` any prefix of them back to images, and `forward`
    for the rectified-flow training loss.

    Example:

    ```python
    >>> model = FlexTokModel.from_pretrained("EPFL-VILAB/flextok_d18_d28_in1k")  # or a converted folder
    >>> token_ids = model.encode(images)  # images [B, 3, 256, 256] in [-1, 1] -> [B, 256]
    >>> out = model.decode(token_ids[:, :16], num_inference_steps=25, guidance_scale=7.5, output_type="pil")
    ```
    """

    def __init__(self, config: FlexTokConfig):
        super().__init__(config)
        self.vae = AutoencoderKL.from_config(config.vae_config)
        self.vae.requires_grad_(False)
        self.encoder = FlexTokEncoder(config)
        self.quantizer = FSQuantizer(config.fsq_levels)
        self.decoder = FlexTokDecoder(config)
        self.repa_projector = FlexTokREPAProjector(config) if config.repa_layer is not None else None
        self.image_processor = VaeImageProcessor(vae_scale_factor=config.vae_downsample_factor)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, vae_config=None, **kwargs):
        """Loads our format (transformers `save_pretrained`) or a released checkpoint in the reference's format
        (hydra-style `config.json` + `model.safetensors`, or one `.safetensors` file carrying the config in its
        metadata), from a folder, a file or a Hub repo id. For the released format, `vae_config` (a diffusers config
        dict, a JSON file or a folder) stands in for the VAE repo the checkpoint names; by default it is looked up
        beside the checkpoint, then in that repo.
        """
        if kwargs.get("config") is not None:  # a given config means our format
            checkpoint = None
        else:
            checkpoint = find_checkpoint(pretrained_model_name_or_path, **kwargs)
            if checkpoint.is_reference_format:
                model, loading_info = load_reference_checkpoint(cls, checkpoint, vae_config, **kwargs)
                return (model, loading_info) if kwargs.get("output_loading_info") else model
            kwargs["config"] = checkpoint.config_file  # read once: transformers need not resolve it again
        if vae_config is not None:
            raise ValueError(
                f"vae_config only applies to checkpoints in the reference format; {pretrained_model_name_or_path} "
                "is not one (our format keeps the VAE config in its config.json)."
            )
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError:  # its message does not say which file: find it
            if checkpoint is not None:
                checkpoint.check_weights()
            raise

    def get_input_embeddings(self) -> nn.Linear:
        """The encoder's patch embedding, the layer that turns the input into tokens (what transformers' vision models
        return here). accelerate's FSDP asks every model for it."""
        return self.encoder.patch_embed

    # ----------------------------------------------------------------------------------------- input checks

    def check_image_shape(self, images: torch.Tensor):
        """Shape and dtype only: no look at the values, so no host synchronisation (safe inside `forward`)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, 3, H, W] in [-1, 1], got {shape}.")
        if len(images) == 0:
            raise ValueError(f"images must hold at least one image, got an empty batch {tuple(images.shape)}.")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}.")
        self.check_image_size(images.shape[2], images.shape[3])

    def check_images(self, images: torch.Tensor):
        self.check_image_shape(images)
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values; expected finite values in [-1, 1].")
        low, high = images.min().item(), images.max().item()
        if low < -1 - IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
            raise ValueError(f"images must be scaled to [-1, 1], got values in [{low:.3g}, {high:.3g}].")

    def check_image_size(self, height: int, width: int):
        multiple = self.config.image_multiple
        largest = self.config.max_grid_size * multiple
        if (
            not (is_int(height) and is_int(width))
            or not (0 < height <= largest and 0 < width <= largest)
            or height % multiple
            or width % multiple
        ):
            raise ValueError(
                f"image height and width must be positive multiples of {multiple} (VAE factor "
                f"{self.config.vae_downsample_factor} x patch size {self.config.patch_size}) and at most {largest}, "
                f"got {height}x{width}."
            )

    def check_token_ids(self, token_ids) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Accepts `[B, k]` or a list of 1D (or `[1, k]`) tensors; returns (ids zero-padded to `[B, K]`,
        lengths `[B]`)."""
        sequences = list(token_ids) if isinstance(token_ids, (list, tuple)) or token_ids.ndim == 2 else None
        if not sequences:
            raise ValueError("token_ids must be a [B, k] tensor or a non-empty list of 1D tensors.")
        num_registers = self.config.num_registers
        padded = torch.zeros(len(sequences), num_registers, dtype=torch.long, device=self.device)
        lengths = []
        for i, ids in enumerate(sequences):
            ids = torch.as_tensor(ids)
            if ids.ndim == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(
                    f"token_ids[{i}] must be a 1D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}."
                )
            if not 1 <= len(ids) <= num_registers:
                raise ValueError(f"token_ids[{i}] has {len(ids)} tokens; expected 1 to {num_registers}.")
            if ids.min() < 0 or ids.max() >= self.config.codebook_size:
                raise ValueError(
                    f"token_ids[{i}] has ids in [{ids.min().item()}, {ids.max().item()}]; the vocabulary is "
                    f"[0, {self.config.codebook_size})."
                )
            padded[i, : len(ids)] = ids.to(self.device)
            lengths.append(len(ids))
        return padded, torch.tensor(lengths, device=self.device)

    def check_training_inputs(self, batch, latent_shape, noise, sigmas, keep_k, null_condition_mask):
        """Shapes and dtypes of `forward`'s optional inputs. Values are not checked: that would synchronise with the
        device every step (and break `torch.compile` graphs)."""
        if noise is not None and tuple(noise.shape) != tuple(latent_shape):
            raise ValueError(f"noise must have the latents' shape {tuple(latent_shape)}, got {tuple(noise.shape)}.")
        if sigmas is not None and (sigmas.shape != (batch,) or not sigmas.is_floating_point()):
            raise ValueError(f"sigmas must be a float tensor [{batch}] of values in [0, 1], got {sigmas.shape}.")
        if keep_k is not None and (
            keep_k.shape != (batch,) or keep_k.is_floating_point() or keep_k.dtype == torch.bool
        ):
            num_registers = self.config.num_registers
            raise ValueError(f"keep_k must be [{batch}] integers in [1, {num_registers}], got {keep_k}.")
        if null_condition_mask is not None and (
            null_condition_mask.shape != (batch,) or null_condition_mask.dtype != torch.bool
        ):
            raise ValueError(f"null_condition_mask must be a bool tensor [{batch}], got {null_condition_mask}.")

    # ------------------------------------------------------------------------------------------ tokenizer

    def encode_latents(
        self, images: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [-1, 1] -> scaled VAE latents `[B, C, H/f, W/f]` (posterior mean unless
        `config.vae_sample_posterior`, then a sample drawn image by image from `generator`, or one per image)."""
        check_generators(generator, len(images))  # also where no posterior sample needs it
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        if not self.config.vae_sample_posterior:
            return posterior.mode() * self.config.vae_scaling_factor
        mean = posterior.mean
        noise = per_image_noise(mean.shape, generator, mean.device, mean.dtype)
        return (mean + posterior.std * noise) * self.config.vae_scaling_factor

    @apply_forward_hook
    def encode(
        self,
        images: torch.Tensor,
        return_dict: bool = False,
        target: float | None = None,
        metric: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "latent_mse",
        generator: torch.Generator | list[torch.Generator] | None = None,
        **adaptive_kwargs,
    ) -> "torch.LongTensor | FlexTokEncoderOutput | AdaptiveTokenizationOutput":
        """Tokenize images, into all `num_registers` tokens each or, given a quality `target`, into per image the
        fewest tokens whose reconstruction meets it.

        Args:
            images (`torch.FloatTensor` `[B, 3, H, W]` in [-1, 1]): H and W multiples of `config.image_multiple`.
            return_dict (`bool`): return a [`FlexTokEncoderOutput`] (ids, codes, VAE latents) instead of the ids;
                ignored with `target`, which always returns its own output.
            target (`float`, *optional*): the reconstruction quality to reach, in the unit of `metric`: adaptive
                tokenization by [`~evaluation.adaptive.adaptive_tokenize`], which decodes candidate prefixes (a
                binary search, one batched `decode` per round).
            metric (`str` or callable): with `target`: "latent_mse" (at most `target`), "psnr" (dB, at least
                `target`) or a callable distance, as `adaptive_tokenize` takes it.
            generator (`torch.Generator`, *optional*): draws the VAE posterior samples, image by image, when
                `config.vae_sample_posterior` (else unused); with `target`, the search's decoder noise too.
            adaptive_kwargs: with `target`, the other options of `adaptive_tokenize`: `candidates`, `refine`,
                `num_inference_steps`, `guidance_scale`, `norm_guidance`.

        Returns:
            Without `target`, `torch.LongTensor` `[B, num_registers]`: token ids, coarse to fine; any prefix can be
            decoded. With `target`, an [`~evaluation.adaptive.AdaptiveTokenizationOutput`]: `token_ids` (a list of B
            1D tensors, of lengths `lengths` `[B]`), `scores` `[B]`, `met_target` `[B]` and the search's cost.
        """
        if target is not None:
            # The search lives with the evaluation code, which imports this module.
            from .evaluation.adaptive import adaptive_tokenize

            return adaptive_tokenize(self, images, target, metric, generator=generator, **adaptive_kwargs)
        if adaptive_kwargs or metric != "latent_mse":
            options = sorted(adaptive_kwargs) + (["metric"] if metric != "latent_mse" else [])
            raise ValueError(f"{options} only apply to adaptive tokenization, with a target.")
        self.check_images(images)
        with torch.no_grad():
            latents = self.encode_latents(images, generator)
            codes, token_ids = self.quantizer(self.encoder(latents))
        if return_dict:
            return FlexTokEncoderOutput(token_ids=token_ids, codes=codes, latents=latents)
        return token_ids

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | None = None,
        latents: torch.FloatTensor | None = None,
    ) -> torch.FloatTensor:
        """Initial noise `[B, C, H/f, W/f]` in float32 on `device` (default the model's), drawn image by image from
        `generator` (a list gives one per image), so a CPU generator reproduces the reference's noise for the same
        seed. Given `latents` are checked and moved instead."""
        factor = self.config.vae_downsample_factor
        shape = (batch_size, self.config.latent_channels, height // factor, width // factor)
        device = device or self.device
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        return per_image_noise(shape, generator, device, torch.float32)

    # FlexTokPipeline calls this and the next two methods itself; under CPU offload `apply_forward_hook` moves the model
    # in first, as the offload hook does for `forward`.
    @apply_forward_hook
    def prepare_registers(
        self, token_ids: torch.LongTensor | list[torch.LongTensor]
    ) -> tuple[torch.FloatTensor, torch.LongTensor]:
        """The decoder's condition for token ids `[B, k]` or a list of B prefixes (lengths 1..num_registers): FSQ
        codes `[B, num_registers, len(fsq_levels)]` (past each prefix those of id 0, never read), and the prefix
        lengths `keep_k` `[B]`, past which the decoder puts its mask token."""
        padded_ids, keep_k = self.check_token_ids(token_ids)
        return self.quantizer.indices_to_codes(padded_ids), keep_k

    @apply_forward_hook
    def guided_velocity(
        self,
        latents: torch.Tensor,
        sigma: float,
        codes: torch.Tensor,
        keep_k: torch.LongTensor,
        guidance: FlowGuidance,
        momentum_buffer: MomentumBuffer | None = None,
    ) -> torch.FloatTensor:
        """One guided velocity evaluation at noise level `sigma` for latents `[B, C, H/f, W/f]` and the registers of
        [`~FlexTokModel.prepare_registers`]; with guidance the conditional and unconditional passes run as one batch
        of 2B. `momentum_buffer` is APG's state, from `guidance.new_momentum_buffer()` once per sampling run.

        Returns:
            `torch.FloatTensor` `[B, C, H/f, W/f]` (float32).
        """
        batch = latents.shape[0]
        timesteps = torch.full((batch,), sigma, device=latents.device)
        if not guidance.is_enabled:
            return self.decoder(latents, timesteps, codes, keep_k).float()
        null_condition_mask = torch.arange(2 * batch, device=latents.device) >= batch
        velocity = self.decoder(
            latents.repeat(2, 1, 1, 1),
            timesteps.repeat(2),
            codes.repeat(2, 1, 1),
            keep_k.repeat(2),
            null_condition_mask,
        ).float()
        return guidance(*velocity.chunk(2), momentum_buffer)

    @apply_forward_hook
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents `[B, C, H/f, W/f]` -> images `[B, 3, H, W]` in about [-1, 1] (unclamped), in the VAE's
        dtype; the inverse of `encode_latents`."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.config.vae_scaling_factor).sample

    @apply_forward_hook
    @torch.no_grad()
    def decode(
        self,
        token_ids: torch.LongTensor | list[torch.LongTensor],
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        norm_guidance: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.FloatTensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        scheduler: FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler | None = None,
        progress_bar: Callable[[Iterable], Iterable] | None = None,
    ) -> FlexTokDecoderOutput | tuple:
        """Detokenize: sample images whose first k tokens are `token_ids`, with the released sampler (see
        `flextok_hf.sampling`).

        Args:
            token_ids (`torch.LongTensor` `[B, k]` or a list of B 1D tensors of lengths 1..num_registers): the
                prefixes may differ in length; they go through the decoder together, one batched call per step.
            num_inference_steps (`int`): steps T from t=1 (noise) to t=0, at t = i/T; the decoder runs T times with
                Euler, 2T - 1 times with Heun.
            guidance_scale (`float`): guidance strength, finite and >= 0; 1.0 disables guidance (and the
                unconditional pass).
            norm_guidance (`bool`): adaptive projected guidance (APG) instead of plain classifier-free guidance.
            generator (`torch.Generator` or list): for the initial noise.
            height, width (`int`, *optional*): output size in pixels, default `config.image_size`.
            latents (`torch.FloatTensor` `[B, C, H/f, W/f]`, *optional*): initial noise, drawn if not given.
            output_type (`str`): "pt" (tensor `[B, 3, H, W]`, about [-1, 1], unclamped), "np" (`[B, H, W, 3]` in
                [0, 1]), "pil", or "latent" (the sampled VAE latents).
            scheduler: a `FlowMatchEulerDiscreteScheduler` (default, shift 1, the released sampler) or a second-order
                `FlowMatchHeunDiscreteScheduler`; its own shift applies on top of t = i/T.
            progress_bar: wraps the iterable of time steps (one per decoder evaluation); default a tqdm bar.

        Returns:
            [`FlexTokDecoderOutput`] with `images` and `latents`, or a tuple `(images,)` if not `return_dict`.
        """
        codes, keep_k = self.prepare_registers(token_ids)
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}.")
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler()
        set_flow_timesteps(scheduler, num_inference_steps)
        guidance = FlowGuidance(guidance_scale, "apg" if norm_guidance else "cfg")
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        self.check_image_size(height, width)
        latents = self.prepare_latents(len(codes), height, width, generator, latents=latents)

        # The model is told the scheduler's sigmas, so a scheduler's own shift changes conditioning and steps alike.
        # Entry `step` is where the latents are: Heun lists each inner sigma twice, as the end of one step (its
        # corrector call) and the start of the next.
        momentum_buffer = guidance.new_momentum_buffer()
        progress_bar = progress_bar or logging.tqdm
        for step, timestep in enumerate(progress_bar(scheduler.timesteps)):
            sigma = scheduler.sigmas[step].item()
            velocity = self.guided_velocity(latents, sigma, codes, keep_k, guidance, momentum_buffer)
            latents = scheduler.step(velocity, timestep, latents).prev_sample

        images = latents if output_type == "latent" else self.decode_latents(latents)
        if output_type in ("np", "pil"):
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        if not return_dict:
            return (images,)
        return FlexTokDecoderOutput(images=images, latents=latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, num_tokens: int | list[int] | None = None, **decode_kwargs):
        """Encode images and decode the first `num_tokens` tokens of each: an int, one int per image, or `None` for
        all `config.num_registers`. `decode_kwargs` go to [`~FlexTokModel.decode`] (its height and width default to
        the input's); its `generator` also draws the VAE posterior samples (`config.vae_sample_posterior`)."""
        token_ids = self.encode(images, generator=decode_kwargs.get("generator"))
        num_registers = self.config.num_registers
        lengths = torch.as_tensor(num_registers if num_tokens is None else num_tokens)
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.ndim > 1:
            raise ValueError(
                f"num_tokens must be an int or one int per image in [1, {num_registers}], got {num_tokens}."
            )
        lengths = lengths.expand(len(token_ids)) if lengths.ndim == 0 else lengths
        if len(lengths) != len(token_ids):
            raise ValueError(f"num_tokens has {len(lengths)} entries for {len(token_ids)} images.")
        if lengths.min() < 1 or lengths.max() > num_registers:
            raise ValueError(f"num_tokens must be in [1, {num_registers}], got {num_tokens}.")
        decode_kwargs.setdefault("height", images.shape[2])
        decode_kwargs.setdefault("width", images.shape[3])
        return self.decode([ids[:k] for ids, k in zip(token_ids, lengths.tolist(), strict=True)], **decode_kwargs)

    # ------------------------------------------------------------------------------------------- training

    def sample_keep_k(self, batch_size: int, device) -> torch.LongTensor:
        """Nested dropout: how many registers each image keeps (`config.nested_dropout_mode`)."""
        num_registers = self.config.num_registers
        if self.config.nested_dropout_mode == "pow2":
            powers = 2 ** torch.arange(num_registers.bit_length(), device=device)
            return powers[torch.randint(len(powers), (batch_size,), device=device)]
        keep_k = torch.randint(1, num_registers + 1, (batch_size,), device=device)
        if self.config.nested_dropout_mode == "uniform_pow2":
            keep_k = 2 ** torch.ceil(torch.log2(keep_k.float())).long()
        return keep_k

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        keep_k: torch.LongTensor | None = None,
        null_condition_mask: torch.BoolTensor | None = None,
        repa_target_features: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlexTokOutput | tuple:
        """Rectified-flow training loss with nested dropout (and REPA when configured).

        Only shapes and dtypes are checked here, never values, so the step runs without host synchronisation and
        compiles as one graph (`torch.compile(model.forward, fullgraph=True)`).

        Args:
            pixel_values (`[B, 3, H, W]` in [-1, 1], *optional*): images, encoded by the frozen VAE.
            latents (`[B, C, H/f, W/f]`, *optional*): precomputed scaled VAE latents instead of `pixel_values`.
            noise (`[B, C, H/f, W/f]`, *optional*): Gaussian noise; drawn if not given.
            sigmas (`[B]`, *optional*): noise levels in [0, 1]; default logit-normal, `sigmoid(N(0, 1))`.
            keep_k (`[B]`, *optional*): registers kept, in [1, num_registers]; in training sampled per
                `config.nested_dropout_mode`, in eval mode all are kept.
            null_condition_mask (`[B]` bool, *optional*): images trained unconditionally; in training each with
                probability `config.null_condition_prob`, in eval mode none.
            repa_target_features (`[B, N, config.repa_feature_size]`, *optional*): patch features of a frozen vision
                encoder (N a square number) for the REPA loss; needs `config.repa_layer`.

        Returns:
            [`FlexTokOutput`] with `flow_loss = mean((decoder(x_t, sigma) - (noise - latents))^2)` and
            `loss = flow_loss + config.repa_loss_weight * repa_loss`.
        """
        if (pixel_values is None) == (latents is None):
            raise ValueError("Pass exactly one of pixel_values (images) or latents (scaled VAE latents).")
        if latents is None:
            self.check_image_shape(pixel_values)
            with torch.no_grad():
                latents = self.encode_latents(pixel_values)
        elif latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be [B, {self.config.latent_channels}, H/f, W/f] scaled VAE latents, got "
                f"{tuple(latents.shape)}."
            )
        if repa_target_features is not None and self.repa_projector is None:
            raise ValueError("repa_target_features needs a model with a REPA projector (set config.repa_layer).")
        latents = latents.to(self.device, torch.float32)
        codes, token_ids = self.quantizer(self.encoder(latents))

        batch, device = latents.shape[0], latents.device
        self.check_training_inputs(batch, latents.shape, noise, sigmas, keep_k, null_condition_mask)
        noise = torch.randn_like(latents) if noise is None else noise.to(latents)
        sigmas = torch.sigmoid(torch.randn(batch, device=device)) if sigmas is None else sigmas.to(latents)
        if keep_k is None and self.training:
            keep_k = self.sample_keep_k(batch, device)
        if null_condition_mask is None and self.training:
            null_condition_mask = torch.rand(batch, device=device) < self.config.null_condition_prob
        keep_k = keep_k.to(device) if keep_k is not None else None
        null_condition_mask = null_condition_mask.to(device) if null_condition_mask is not None else None
        sigma = sigmas.view(-1, 1, 1, 1)
        noisy_latents = sigma * noise + (1 - sigma) * latents
        target = noise - latents
        predicted, hidden_states = self.decoder(
            noisy_latents, sigmas, codes, keep_k, null_condition_mask, output_hidden_states=True
        )
        flow_loss = F.mse_loss(predicted.float(), target)
        loss, repa_loss = flow_loss, None
        if repa_target_features is not None:
            grid = (latents.shape[2] // self.config.patch_size, latents.shape[3] // self.config.patch_size)
            patch_tokens = hidden_states[self.config.repa_layer][:, : grid[0] * grid[1]]
            repa_loss = repa_alignment_loss(self.repa_projector(patch_tokens), repa_target_features.to(device), grid)
            loss = flow_loss + self.config.repa_loss_weight * repa_loss
        output = FlexTokOutput(
            loss=loss,
            flow_loss=flow_loss,
            repa_loss=repa_loss,
            token_ids=token_ids,
            predicted_velocity=predicted,
            target_velocity=target,
            noisy_latents=noisy_latents,
            sigmas=sigmas,
            keep_k=keep_k,
        )
        return output if return_dict else output.to_tuple()


AutoConfig.register(FlexTokConfig.model_type, FlexTokConfig)
AutoModel.register(FlexTokConfig, FlexTokModel)
