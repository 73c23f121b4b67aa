"""FlexTok autoregressive generator: a LlamaGen-style decoder-only transformer over FlexTok image tokens."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers import AutoModel, PreTrainedModel, StaticCache
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutput

from .configuration_flextok_ar import FlexTokARConfig
from .hub_utils import ModelCardMixin, StrictLoadingMixin
from .sampling import TokenSampler, draw_uniforms
from .utils import check_generators, check_num_tokens

# Shapes (batch size x guidance x prompt-length bucket) the compiled token step may be compiled for.
MAX_COMPILED_SHAPES = 64


def _describe(value) -> str:
    """A tensor's dtype and shape, or another value's type, for error messages."""
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class FlexTokARMLP(nn.Module):
    """SwiGLU feed-forward block; the gate and up projections are one GEMM."""

    def __init__(self, config: FlexTokARConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.dropout(self.down_proj(F.silu(gate) * up))


class FlexTokARAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`, queries, keys and values from one GEMM;
    positions are learned embeddings, no RoPE."""

    def __init__(self, config: FlexTokARConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `[batch, query_length, hidden_size]`.
            attention_mask: additive `[batch, 1, query_length, key_length]` (0 or -inf); `key_length` counts the
                cached keys too.
            past_key_values: cache that receives this call's keys and values and supplies the earlier ones.
        """
        batch_size, query_length, _ = hidden_states.shape
        qkv_shape = (batch_size, query_length, 3, self.num_heads, self.head_dim)
        query_states, key_states, value_states = self.qkv_proj(hidden_states).view(qkv_shape).permute(2, 0, 3, 1, 4)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attn_output = F.scaled_dot_product_attention(
            query_states,
            key_states,
            value_states,
            attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, query_length, -1)
        return self.dropout(self.o_proj(attn_output))


class FlexTokARDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FlexTokARConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = FlexTokARAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FlexTokARMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, past_key_values=past_key_values
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FlexTokARPreTrainedModel(ModelCardMixin, StrictLoadingMixin, PreTrainedModel):
    config: FlexTokARConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlexTokARDecoderLayer"]
    _repeated_blocks = ["FlexTokARDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FlexTokARModel):
            init.normal_(module.image_start_embedding, mean=0.0, std=self.config.initializer_range)
            if module.null_text_embedding is not None:
                init.normal_(module.null_text_embedding, mean=0.0, std=self.config.initializer_range)


class FlexTokARModel(FlexTokARPreTrainedModel):
    """
    Decoder-only transformer that predicts FlexTok image tokens coarse to fine, given a class label or the hidden
    states of a text encoder.

    The input sequence is `[condition tokens, image start, token_0, ..., token_{N-2}]`: the image-start slot predicts
    token 0 and token i predicts token i + 1. The slot that predicts token j carries position embedding j, so
    `max_position_embeddings` rows cover images of up to `max_position_embeddings` tokens.
    """

    def __init__(self, config: FlexTokARConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # A fixed last prefix slot predicts token 0 whatever the condition's length or padding.
        self.image_start_embedding = nn.Parameter(torch.empty(config.hidden_size))

        # Text enters as a projected prefix rather than through cross-attention: one causal stack whose KV cache holds
        # the prompt after the first step, as in LlamaGen's text-to-image models; padded text keys are masked out.
        if config.is_text_conditional:
            self.class_embedding = None
            self.text_projection = nn.Linear(config.text_hidden_size, config.hidden_size)
            self.null_text_embedding = nn.Parameter(torch.empty(config.hidden_size))
        else:
            # The last row is the null class of classifier-free guidance.
            self.class_embedding = nn.Embedding(config.num_classes + 1, config.hidden_size)
            self.text_projection = None
            self.null_text_embedding = None

        self.layers = nn.ModuleList(
            [FlexTokARDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Set by `compile_generation`.
        self._compiled_generation_step = None
        self._kept_cache = self._kept_cache_shape = None

        self.post_init()

    def _check_image_tokens(
        self, token_ids: torch.Tensor, name: str, allow_ignore_index: bool = False, check_values: bool = True
    ) -> None:
        vocab_size = self.config.vocab_size
        if (
            not isinstance(token_ids, torch.Tensor)
            or token_ids.dim() != 2
            or token_ids.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(f"{name} must be an integer tensor [batch, num_tokens], got {_describe(token_ids)}.")
        if not 1 <= token_ids.shape[1] <= self.config.max_position_embeddings:
            raise ValueError(
                f"{name} must hold 1 to max_position_embeddings={self.config.max_position_embeddings} tokens per "
                f"image, got {token_ids.shape[1]}."
            )
        if not check_values:
            return
        in_vocab = (token_ids >= 0) & (token_ids < vocab_size)
        if allow_ignore_index:
            in_vocab |= token_ids == -100
        if not bool(in_vocab.all()):
            allowed = f"[0, {vocab_size}) or -100" if allow_ignore_index else f"[0, {vocab_size})"
            raise ValueError(
                f"{name} must lie in {allowed}, got values from {token_ids.min().item()} to {token_ids.max().item()}."
            )

    def _check_text_states(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prefix: str,
        empty_hint: str,
        check_values: bool = True,
    ) -> int:
        """Validates text encoder states named `{prefix}hidden_states` and their mask; returns the batch size."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[1] == 0:
            raise ValueError(
                f"{prefix}hidden_states must have shape [batch, text_length >= 1, text_hidden_size], got "
                f"{_describe(hidden_states)}."
            )
        if hidden_states.shape[-1] != self.config.text_hidden_size:
            raise ValueError(
                f"{prefix}hidden_states must have hidden size config.text_hidden_size={self.config.text_hidden_size}, "
                f"got {hidden_states.shape[-1]}."
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"{prefix}attention_mask must have shape {tuple(hidden_states.shape[:2])} [batch, text_length], "
                    f"got {_describe(attention_mask)}."
                )
            if check_values and not bool(attention_mask.bool().any(dim=1).all()):
                raise ValueError(
                    f"Every sample needs at least one unmasked text token in {prefix}attention_mask; {empty_hint}."
                )
        return hidden_states.shape[0]

    def _check_condition(
        self,
        class_labels: torch.LongTensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        drop_condition: torch.BoolTensor | None,
        check_values: bool = True,
    ) -> int:
        """Validates the conditioning arguments for this model's mode and returns the batch size. Without
        `check_values` only shapes and dtypes are checked, which needs no host synchronisation (training)."""
        if class_labels is not None and encoder_hidden_states is not None:
            raise ValueError("Pass either class_labels or encoder_hidden_states, not both.")
        if self.config.is_text_conditional:
            if encoder_hidden_states is None:
                raise ValueError(
                    "This model is text-conditional (config.text_hidden_size is set): pass encoder_hidden_states "
                    "[batch, text_length, text_hidden_size] and their encoder_attention_mask."
                )
            batch_size = self._check_text_states(
                encoder_hidden_states,
                encoder_attention_mask,
                "encoder_",
                "use drop_condition for the unconditional (null text) branch",
                check_values,
            )
        else:
            if class_labels is None:
                raise ValueError(
                    f"This model is class-conditional (config.num_classes={self.config.num_classes}): pass "
                    "class_labels [batch]."
                )
            if encoder_attention_mask is not None:
                raise ValueError("encoder_attention_mask is only for text-conditional models.")
            if (
                not isinstance(class_labels, torch.Tensor)
                or class_labels.dim() != 1
                or class_labels.dtype not in (torch.int32, torch.int64)
            ):
                raise ValueError(f"class_labels must be an integer tensor [batch], got {_describe(class_labels)}.")
            if check_values and not bool(((class_labels >= 0) & (class_labels < self.config.num_classes)).all()):
                raise ValueError(
                    f"class_labels must lie in [0, {self.config.num_classes}), got values from "
                    f"{class_labels.min().item()} to {class_labels.max().item()}; use drop_condition for the null "
                    "class."
                )
            batch_size = class_labels.shape[0]
        if drop_condition is not None and (
            not isinstance(drop_condition, torch.Tensor)
            or drop_condition.dtype != torch.bool
            or drop_condition.shape != (batch_size,)
        ):
            raise ValueError(f"drop_condition must be a bool tensor [{batch_size}], got {_describe(drop_condition)}.")
        return batch_size

    def embed_prefix(
        self,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        drop_condition: torch.BoolTensor | None = None,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """
        Embeds the condition followed by the image-start slot.

        Args:
            class_labels: `[batch]` class ids (class-conditional models).
            encoder_hidden_states: `[batch, text_length, text_hidden_size]` (text-conditional models).
            encoder_attention_mask: `[batch, text_length]`, 1 for text tokens to attend, 0 for padding.
            drop_condition: `[batch]` bool, True where the condition is replaced by the null class / null text.

        Returns:
            `prefix_embeds` `[batch, prefix_length, hidden_size]` and `prefix_mask` `[batch, prefix_length]` (bool,
            False for padding), with `prefix_length` 2 for class labels and `text_length + 1` for text.
        """
        if self.config.is_text_conditional:
            batch_size, text_length, _ = encoder_hidden_states.shape
            condition_embeds = self.text_projection(encoder_hidden_states.to(self.text_projection.weight.dtype))
            if encoder_attention_mask is None:
                condition_mask = torch.ones(batch_size, text_length, dtype=torch.bool, device=condition_embeds.device)
            else:
                condition_mask = encoder_attention_mask.to(device=condition_embeds.device, dtype=torch.bool)
            if drop_condition is not None:
                # The null text is one learned token in the first slot, all other text slots masked out.
                dropped = drop_condition.to(condition_embeds.device)[:, None]
                null_text = torch.zeros_like(condition_embeds)
                null_text[:, 0] = self.null_text_embedding
                null_mask = torch.zeros_like(condition_mask)
                null_mask[:, 0] = True
                condition_embeds = torch.where(dropped[..., None], null_text, condition_embeds)
                condition_mask = torch.where(dropped, null_mask, condition_mask)
        else:
            if drop_condition is not None:
                null_class = torch.full_like(class_labels, self.config.num_classes)
                class_labels = torch.where(drop_condition.to(class_labels.device), null_class, class_labels)
            condition_embeds = self.class_embedding(class_labels)[:, None]
            condition_mask = torch.ones(condition_embeds.shape[:2], dtype=torch.bool, device=condition_embeds.device)

        batch_size = condition_embeds.shape[0]
        image_start = self.image_start_embedding + self.embed_positions.weight[0]
        prefix_embeds = torch.cat([condition_embeds, image_start.expand(batch_size, 1, -1)], dim=1)
        prefix_mask = F.pad(condition_mask, (0, 1), value=True)
        return prefix_embeds, prefix_mask

    def embed_image_tokens(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """
        Embeds the first image tokens `token_ids` `[batch, length]`; returns `[batch, length, hidden_size]`. Token i
        sits in the slot that predicts token i + 1, hence position i + 1.
        """
        positions = torch.arange(1, token_ids.shape[1] + 1, device=token_ids.device)
        return self.embed_tokens(token_ids) + self.embed_positions(positions)

    @staticmethod
    def _attention_mask(
        key_padding_mask: torch.BoolTensor, query_positions: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """
        Causal attention mask `[batch, 1, num_queries, num_keys]` for queries at sequence positions
        `query_positions` `[num_queries]` over keys 0 .. num_keys - 1, where `key_padding_mask` `[batch, num_keys]`
        is False for padded keys. Additive (0 or -inf, in `dtype`): attention would otherwise convert a boolean mask
        in every layer.
        """
        key_positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
        query_positions = query_positions.to(key_padding_mask.device)[:, None]
        causal = key_positions[None, :] <= query_positions
        # A padded slot still attends to itself, so its attention row is never empty (which would yield NaN).
        allowed = (causal & key_padding_mask[:, None, None, :]) | (key_positions == query_positions)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def _decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.BoolTensor,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """
        Runs the decoder layers on `inputs_embeds` `[batch, length, hidden_size]` after the cached sequence, with the
        additive `attention_mask` `[batch, 1, length, num_keys]` from `_attention_mask`; returns the normed hidden
        states `[batch, length, hidden_size]`.
        """
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values)
        return self.norm(hidden_states)

    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        drop_condition: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
    ) -> CausalLMOutput:
        r"""
        Teacher-forced next-token prediction.

        Args:
            input_ids (`torch.LongTensor` of shape `[batch, num_tokens]`):
                FlexTok image tokens in [0, vocab_size), 1 <= num_tokens <= max_position_embeddings.
            class_labels (`torch.LongTensor` of shape `[batch]`, *optional*):
                Class ids in [0, num_classes); class-conditional models only.
            encoder_hidden_states (`torch.Tensor` of shape `[batch, text_length, text_hidden_size]`, *optional*):
                Last hidden states of a text encoder; text-conditional models only.
            encoder_attention_mask (`torch.Tensor` of shape `[batch, text_length]`, *optional*):
                1 for text tokens to attend, 0 for padding (the text tokenizer's attention mask).
            drop_condition (`torch.BoolTensor` of shape `[batch]`, *optional*):
                True where the condition is replaced by the null class / null text (the unconditional branch of
                classifier-free guidance). In training mode, further samples are dropped at random with
                `config.class_dropout_prob` / `config.text_dropout_prob`.
            labels (`torch.LongTensor` of shape `[batch, num_tokens]`, *optional*):
                Targets, usually `input_ids`; -100 is ignored.

        Returns:
            [`CausalLMOutput`] with `logits` `[batch, num_tokens, vocab_size]`, where `logits[:, i]` predicts token i
            from the condition and tokens < i, and `loss`, the mean cross-entropy, when `labels` is given.
        """
        # In training, shapes and dtypes only: value checks would synchronise with the device every step.
        check_values = not self.training
        self._check_image_tokens(input_ids, "input_ids", check_values=check_values)
        batch_size = self._check_condition(
            class_labels, encoder_hidden_states, encoder_attention_mask, drop_condition, check_values=check_values
        )
        if input_ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but the condition has {batch_size}.")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
                )
            self._check_image_tokens(labels, "labels", allow_ignore_index=True, check_values=check_values)

        if self.training:
            if self.config.is_text_conditional:
                dropout_prob = self.config.text_dropout_prob
            else:
                dropout_prob = self.config.class_dropout_prob
            random_drop = torch.rand(batch_size, device=input_ids.device) < dropout_prob
            drop_condition = random_drop if drop_condition is None else drop_condition | random_drop

        prefix_embeds, prefix_mask = self.embed_prefix(
            class_labels, encoder_hidden_states, encoder_attention_mask, drop_condition
        )
        # The last token is only a target: nothing after it is predicted.
        token_embeds = self.embed_image_tokens(input_ids[:, :-1])
        inputs_embeds = torch.cat([prefix_embeds, token_embeds], dim=1)
        key_padding_mask = F.pad(prefix_mask, (0, token_embeds.shape[1]), value=True)

        query_positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        hidden_states = self._decode(
            inputs_embeds, self._attention_mask(key_padding_mask, query_positions, inputs_embeds.dtype)
        )
        logits = self.lm_head(hidden_states[:, prefix_embeds.shape[1] - 1 :])

        loss = None
        if labels is not None:
            # cross_entropy takes int64 targets only; labels may be int32 like input_ids.
            targets = labels.flatten().to(device=logits.device, dtype=torch.long)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def _join_text_batches(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        other_hidden_states: torch.Tensor,
        other_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """
        Concatenates two batches of text states of possibly different lengths along the batch, padding the shorter
        one at its end with masked slots: text slots carry no position embedding and padded keys are masked out, so
        the padding does not change what the other slots compute.
        """
        other_hidden_states = other_hidden_states.to(device=hidden_states.device, dtype=hidden_states.dtype)
        text_length = max(hidden_states.shape[1], other_hidden_states.shape[1])
        padded_states, padded_masks = [], []
        for states, mask in ((hidden_states, attention_mask), (other_hidden_states, other_attention_mask)):
            if mask is None:
                mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
            padding = text_length - states.shape[1]
            padded_states.append(F.pad(states, (0, 0, 0, padding)))
            padded_masks.append(F.pad(mask.to(device=states.device, dtype=torch.bool), (0, padding), value=False))
        return torch.cat(padded_states), torch.cat(padded_masks)

    @apply_forward_hook  # moves the model in under pipeline CPU offload, which otherwise hooks `forward` only
    @torch.no_grad()
    def generate_tokens(
        self,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        num_tokens: int | None = None,
        guidance_scale: float = 1.0,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        negative_encoder_attention_mask: torch.Tensor | None = None,
        callback_on_token: Callable[[int, torch.LongTensor], None] | None = None,
    ) -> torch.LongTensor:
        r"""
        Generates FlexTok image tokens, coarse to fine, with a KV cache and classifier-free guidance; each step's
        token is chosen by a [`~sampling.TokenSampler`] built from the sampling arguments.

        Args:
            class_labels (`torch.LongTensor` of shape `[batch]`, *optional*):
                Class ids; class-conditional models only.
            encoder_hidden_states (`torch.Tensor` of shape `[batch, text_length, text_hidden_size]`, *optional*):
                Text encoder hidden states; text-conditional models only.
            encoder_attention_mask (`torch.Tensor` of shape `[batch, text_length]`, *optional*):
                1 for text tokens to attend, 0 for padding.
            num_tokens (`int`, *optional*, defaults to `config.max_position_embeddings`):
                Tokens per image, 1 to `max_position_embeddings`; fewer tokens give a coarser image.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale s, finite and >= 0: logits = u + s * (c - u), where u comes from the
                learned null class / null text, or from the negative prompt. At 1.0 the unconditional pass is skipped.
            do_sample (`bool`, *optional*, defaults to `True`):
                Sample from the processed distribution; `False` takes the argmax (temperature, top-k, top-p and
                generator unused).
            temperature (`float`, *optional*, defaults to 1.0):
                Divides the guided logits; must be > 0.
            top_k (`int`, *optional*):
                Keep only the k most likely tokens.
            top_p (`float`, *optional*):
                Keep the smallest set of tokens whose probability reaches top_p, in (0, 1].
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Random generator for sampling, for reproducible results. A list holds one generator per batch row:
                row i is then sampled from `generator[i]` alone and equals a batch of one with that generator. Each
                step draws one uniform number per row from the generator, on the generator's device, so a CPU
                generator also drives a model on an accelerator.
            negative_encoder_hidden_states (`torch.Tensor` of shape `[batch, length, text_hidden_size]`, *optional*):
                Text encoder hidden states of a negative prompt; text-conditional models only. With guidance, the
                unconditional half uses them instead of the learned null text, steering the tokens away from them.
                The batch and hidden size must match `encoder_hidden_states`; the length may differ (the shorter
                text is padded and masked). Ignored when `guidance_scale` is 1.0, as diffusers pipelines ignore
                `negative_prompt` without guidance.
            negative_encoder_attention_mask (`torch.Tensor` of shape `[batch, length]`, *optional*):
                1 for negative text tokens to attend, 0 for padding; only with `negative_encoder_hidden_states`.
            callback_on_token (`Callable[[int, torch.LongTensor], None]`, *optional*):
                Called after each step with the token index and the tokens so far `[batch, index + 1]`, e.g. to
                advance a progress bar.

        Returns:
            `torch.LongTensor` of shape `[batch, num_tokens]`.
        """
        num_tokens = self.config.max_position_embeddings if num_tokens is None else num_tokens
        num_tokens = check_num_tokens(num_tokens, self.config.max_position_embeddings)
        sampler = TokenSampler(guidance_scale, do_sample, temperature, top_k, top_p)
        batch_size = self._check_condition(class_labels, encoder_hidden_states, encoder_attention_mask, None)
        if negative_encoder_attention_mask is not None and negative_encoder_hidden_states is None:
            raise ValueError("negative_encoder_attention_mask needs negative_encoder_hidden_states.")
        if negative_encoder_hidden_states is not None:
            if not self.config.is_text_conditional:
                raise ValueError(
                    "negative_encoder_hidden_states are only for text-conditional models; a class-conditional model "
                    "guides with its null class."
                )
            negative_batch_size = self._check_text_states(
                negative_encoder_hidden_states,
                negative_encoder_attention_mask,
                "negative_encoder_",
                "pass no negative_encoder_hidden_states to guide with the learned null text",
            )
            if negative_batch_size != batch_size:
                raise ValueError(
                    f"negative_encoder_hidden_states has batch size {negative_batch_size} but encoder_hidden_states "
                    f"has {batch_size}: pass one negative text per sample."
                )
        check_generators(generator, batch_size, "sample")

        drop_condition = None
        if sampler.is_guided:
            # Conditional and unconditional halves share one batch of 2 * batch_size.
            if class_labels is not None:
                class_labels = class_labels.repeat(2)
            elif negative_encoder_hidden_states is not None:
                encoder_hidden_states, encoder_attention_mask = self._join_text_batches(
                    encoder_hidden_states,
                    encoder_attention_mask,
                    negative_encoder_hidden_states,
                    negative_encoder_attention_mask,
                )
            else:
                encoder_hidden_states = encoder_hidden_states.repeat(2, 1, 1)
                if encoder_attention_mask is not None:
                    encoder_attention_mask = encoder_attention_mask.repeat(2, 1)
            if negative_encoder_hidden_states is None:
                drop_condition = torch.arange(2 * batch_size, device=self.device) >= batch_size

        # One small loop rather than GenerationMixin.generate: its sampling takes no torch.Generator, and the guided
        # logits must be formed from both halves before sampling. The KV cache is static, so every step after the
        # prefix has the same shapes: attention builds one kernel plan, and a compiled step replays as a CUDA graph.
        prefix_embeds, prefix_mask = self.embed_prefix(
            class_labels, encoder_hidden_states, encoder_attention_mask, drop_condition
        )
        rows, prefix_length = prefix_mask.shape
        device = prefix_embeds.device
        # The last token is only predicted, never fed back; rounding the length up lets prompts of similar lengths
        # share one compiled step.
        cache_length = -(-(prefix_length + self.config.max_position_embeddings - 1) // 16) * 16
        past_key_values = self._generation_cache(rows, cache_length, prefix_embeds.dtype, device)
        key_padding_mask = F.pad(prefix_mask, (0, cache_length - prefix_length), value=True)
        prefix_slots = torch.arange(prefix_length, device=device)
        hidden_states = self._decode(
            prefix_embeds, self._attention_mask(key_padding_mask, prefix_slots, prefix_embeds.dtype), past_key_values
        )

        # Every draw of the call at once, in the order step by step draws would take them: one copy to the device
        # rather than one per step, which a CPU generator would make wait for the GPU.
        uniforms = [None] * num_tokens
        if sampler.do_sample:
            uniforms = draw_uniforms(batch_size, generator, device, num_tokens)
        tokens = torch.empty(batch_size, num_tokens, dtype=torch.long, device=device)
        tokens[:, :1] = sampler.select(self.lm_head(hidden_states[:, -1]), uniforms[0])
        if callback_on_token is not None:
            callback_on_token(0, tokens[:, :1])
        generation_step = self._compiled_generation_step or self._generation_step
        # Step i feeds token i - 1 into cache slot prefix_length + i - 1 with position embedding i.
        cache_slots = torch.arange(prefix_length - 1, prefix_length + num_tokens - 1, device=device)
        positions = torch.arange(num_tokens, device=device)
        # Each batch size and prompt-length bucket is a shape of its own for the compiled step: allow many.
        with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_SHAPES):
            for token_index in range(1, num_tokens):
                last_tokens = tokens[:, token_index - 1 : token_index]
                logits = generation_step(
                    last_tokens.repeat(2, 1) if sampler.is_guided else last_tokens,
                    positions[token_index : token_index + 1],
                    cache_slots[token_index : token_index + 1],
                    key_padding_mask,
                    past_key_values,
                )
                tokens[:, token_index : token_index + 1] = sampler.select(logits, uniforms[token_index])
                if callback_on_token is not None:
                    callback_on_token(token_index, tokens[:, : token_index + 1])
        return tokens

    def _generation_step(
        self,
        token_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache_slot: torch.LongTensor,
        key_padding_mask: torch.BoolTensor,
        past_key_values: StaticCache,
    ) -> torch.Tensor:
        """
        One fixed-shape step of `generate_tokens`: feeds the last tokens `[rows, 1]` (position embedding
        `position_ids` `[1]`, cache slot `cache_slot` `[1]`) through the cached decoder, whose keys are masked by
        `key_padding_mask` `[rows, cache_length]`, and returns the next-token logits `[rows, vocab_size]`. No host
        synchronisation, so `compile_generation` can capture it as one CUDA graph. (Sampling stays outside: inductor
        fails to build the sampler's scan kernels over a 64000-id vocabulary.)
        """
        inputs_embeds = self.embed_tokens(token_ids) + self.embed_positions(position_ids)
        hidden_states = self._decode(
            inputs_embeds, self._attention_mask(key_padding_mask, cache_slot, inputs_embeds.dtype), past_key_values
        )
        return self.lm_head(hidden_states[:, -1])

    def _generation_cache(self, rows: int, length: int, dtype: torch.dtype, device: torch.device) -> StaticCache:
        """
        A static KV cache of `length` slots for `rows` sequences. A compiled step keeps one per shape between calls:
        its CUDA graphs read the cache at fixed addresses (transformers marks them static). Eager generation takes
        a fresh one, so no memory stays held after the call.
        """
        if self._compiled_generation_step is None:
            return StaticCache(config=self.config, max_cache_len=length)
        shape = (rows, length, dtype, device)
        if self._kept_cache_shape == shape:
            self._kept_cache.reset()
        else:
            self._kept_cache, self._kept_cache_shape = StaticCache(config=self.config, max_cache_len=length), shape
        return self._kept_cache

    def compile_generation(self, **compile_kwargs) -> None:
        """
        Compiles the token step of `generate_tokens` with `torch.compile`, by default with `mode="reduce-overhead"`
        (CUDA graphs on a GPU), `fullgraph=True` and `dynamic=False`; `compile_kwargs` override these. The first call
        at each shape (batch size, guidance on or off, prompt length rounded up to 16) compiles (tens of seconds at
        1.5B parameters) and records the graph; later calls replay it. Up to `MAX_COMPILED_SHAPES` shapes are kept.
        The KV cache of the last shape stays allocated between calls.
        """
        compile_kwargs = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False, **compile_kwargs}
        self._compiled_generation_step = torch.compile(self._generation_step, **compile_kwargs)
        self._kept_cache = self._kept_cache_shape = None


AutoModel.register(FlexTokARConfig, FlexTokARModel)

__all__ = [
    "FlexTokARAttention",
    "FlexTokARDecoderLayer",
    "FlexTokARMLP",
    "FlexTokARModel",
    "FlexTokARPreTrainedModel",
]
