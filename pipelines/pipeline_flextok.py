"""FlexTokPipeline: class- or text-conditional image generation with FlexTok (arXiv 2502.13967).

An autoregressive model samples an ordered 1D sequence of 1..256 FlexTok tokens, coarse to fine, and the FlexTok
tokenizer's rectified-flow decoder renders that sequence into an image.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import replace_example_docstring
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flextok_hf.hub_utils import ModelCardMixin
from flextok_hf.modeling_flextok import FlexTokModel
from flextok_hf.modeling_flextok_ar import FlexTokARModel
from flextok_hf.sampling import FlowGuidance, TokenSampler, check_guidance_scale, flow_sigmas, set_flow_timesteps
from flextok_hf.utils import check_generators, check_num_tokens, is_int

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from flextok_hf import FlexTokPipeline

        >>> pipe = FlexTokPipeline.from_pretrained("path/to/saved_pipeline")
        >>> generator = torch.Generator().manual_seed(0)
        >>> # 16 tokens: a coarse image; 256 tokens: every detail the tokenizer can hold.
        >>> images = pipe(class_labels=[207, 360], num_tokens=16, generator=generator).images
        ```
"""


@dataclass
class FlexTokPipelineOutput(ImagePipelineOutput):
    """
    Output of [`FlexTokPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` `[batch, height, width, 3]` or `torch.Tensor`
            `[batch, 3, height, width]`): the generated images, in [0, 1] for "np" and "pt"; for "latent", the
            sampled VAE latents `[batch, latent_channels, height / f, width / f]`.
        tokens (`torch.LongTensor` `[batch, num_tokens]`, *optional*): the sampled FlexTok token ids, returned when
            `return_tokens=True`; `FlexTokModel.decode` renders them again.
    """

    tokens: torch.LongTensor | None = None


class FlexTokPipeline(ModelCardMixin, DiffusionPipeline):
    r"""
    Generates images with FlexTok: `ar_model` samples FlexTok token ids given class labels or a text prompt, and the
    `flextok` tokenizer's rectified-flow decoder turns any number of them (1 to `max_num_tokens`) into an image.

    Args:
        ar_model ([`FlexTokARModel`]): autoregressive generator of FlexTok tokens, class- or text-conditional.
        flextok ([`FlexTokModel`]): the FlexTok tokenizer; its decoder renders token sequences into images.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or [`FlowMatchHeunDiscreteScheduler`]): steps the decoder's
            rectified flow from noise to latents (Euler is the released sampler; Heun is second order).
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): any transformers text encoder whose last hidden
            states condition a text-conditional `ar_model` (its hidden size is `ar_model.config.text_hidden_size`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): the text encoder's tokenizer.
    """

    model_cpu_offload_seq = "text_encoder->ar_model->flextok"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        ar_model: FlexTokARModel,
        flextok: FlexTokModel,
        scheduler: FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.register_modules(
            ar_model=ar_model, flextok=flextok, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        # Only `postprocess` is used ([-1, 1] images to "pt" / "np" / "pil"), which needs no VAE scale factor.
        self.image_processor = VaeImageProcessor()

    def enable_compile(self, **compile_kwargs) -> None:
        """
        Compiles the two hot loops with `torch.compile`: the AR model's token step (by default as CUDA graphs, see
        [`FlexTokARModel.compile_generation`]) and the tokenizer's decoder (`nn.Module.compile`); `compile_kwargs`
        go to both. The first call at each batch size pays the compilation (docs/performance.md gives the measured
        cost); the results match the uncompiled pipeline's up to floating-point rounding.
        """
        self.ar_model.compile_generation(**compile_kwargs)
        self.flextok.decoder.compile(**compile_kwargs)

    def enable_sequential_cpu_offload(self, *args, **kwargs) -> None:
        # accelerate would load weights leaf module by leaf module inside `forward`, but the models' own parameters
        # (`ar_model.image_start_embedding`, the decoder's mask and null tokens) and entry points (`generate_tokens`,
        # `guided_velocity`) lie outside every leaf's `forward`: the hooks would install, then the first call fail.
        raise NotImplementedError(
            "FlexTokPipeline does not support sequential CPU offload; use `enable_model_cpu_offload()` instead."
        )

    @property
    def max_num_tokens(self) -> int:
        """The longest token sequence both the generator and the tokenizer handle."""
        return min(self.ar_model.config.max_position_embeddings, self.flextok.config.num_registers)

    @property
    def guidance_scale(self) -> float:
        """The token sampler's classifier-free guidance scale of the current call."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        """Time steps of the current call's denoising loop, one decoder evaluation each (Heun: two per step but the
        last)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Whether the remaining denoising steps are skipped: `callback_on_step_end` sets `pipe._interrupt = True`."""
        return self._interrupt

    @staticmethod
    def _num_prompts(prompt, prompt_embeds, class_labels) -> int:
        """How many prompts or class labels were given (before `num_images_per_prompt`)."""
        if prompt_embeds is not None:
            return prompt_embeds.shape[0]
        conditions = prompt if prompt is not None else class_labels
        return len(conditions) if isinstance(conditions, list) else 1

    def check_inputs(
        self,
        prompt,
        class_labels,
        negative_prompt,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        num_tokens,
        num_images_per_prompt,
        guidance_scale,
        temperature,
        top_k,
        top_p,
        decoder_guidance_scale,
        num_inference_steps,
        height,
        width,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        if self.ar_model.config.vocab_size != self.flextok.config.codebook_size:
            raise ValueError(
                f"ar_model predicts {self.ar_model.config.vocab_size} token ids but the FlexTok codebook has "
                f"{self.flextok.config.codebook_size}: the two models do not belong together."
            )
        if sum(condition is not None for condition in (prompt, prompt_embeds, class_labels)) != 1:
            raise ValueError(
                "Pass exactly one of `prompt` or `prompt_embeds` (text-conditional) or `class_labels` "
                "(class-conditional)."
            )
        is_text = class_labels is None

        if is_text:
            if not self.ar_model.config.is_text_conditional:
                raise ValueError(
                    f"This pipeline's ar_model is class-conditional ({self.ar_model.config.num_classes} classes): "
                    "pass `class_labels`, not `prompt` or `prompt_embeds`."
                )
            if prompt is not None:
                if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and len(prompt) == 0):
                    raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
                if isinstance(prompt, list) and not all(isinstance(text, str) for text in prompt):
                    raise ValueError("Every entry of `prompt` must be a string.")
            elif not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise ValueError(
                    "`prompt_embeds` must be a tensor [batch, text_length, text_hidden_size] (the text encoder's last "
                    f"hidden states), got {getattr(prompt_embeds, 'shape', prompt_embeds)!r}."
                )
        else:
            if self.ar_model.config.is_text_conditional:
                raise ValueError(
                    "This pipeline's ar_model is text-conditional: pass `prompt` or `prompt_embeds`, not "
                    "`class_labels`."
                )
            labels = [class_labels] if is_int(class_labels) else class_labels
            if not isinstance(labels, list) or len(labels) == 0:
                raise ValueError(f"`class_labels` must be an int or a non-empty list of ints, got {class_labels!r}.")
            num_classes = self.ar_model.config.num_classes
            for label in labels:
                if not is_int(label) or not 0 <= label < num_classes:
                    raise ValueError(f"Class ids must be ints in [0, {num_classes}), got {label!r}.")

        if prompt_attention_mask is not None and prompt_embeds is None:
            raise ValueError("`prompt_attention_mask` goes with `prompt_embeds`.")
        if negative_prompt_attention_mask is not None and negative_prompt_embeds is None:
            raise ValueError("`negative_prompt_attention_mask` goes with `negative_prompt_embeds`.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass `negative_prompt` or `negative_prompt_embeds`, not both.")
        num_prompts = self._num_prompts(prompt, prompt_embeds, class_labels)
        if negative_prompt is not None or negative_prompt_embeds is not None:
            if not is_text:
                raise ValueError(
                    "`negative_prompt` goes with a text `prompt`; class-conditional generation is guided by the "
                    "model's null class, so pass no `negative_prompt` with `class_labels`."
                )
            if negative_prompt_embeds is not None and (
                not isinstance(negative_prompt_embeds, torch.Tensor)
                or negative_prompt_embeds.ndim != 3
                or negative_prompt_embeds.shape[0] != num_prompts
            ):
                raise ValueError(
                    f"`negative_prompt_embeds` must be a tensor [{num_prompts}, text_length, text_hidden_size], one "
                    f"per prompt, got {getattr(negative_prompt_embeds, 'shape', negative_prompt_embeds)!r}."
                )
            if negative_prompt is not None and not (
                isinstance(negative_prompt, str)
                or (isinstance(negative_prompt, list) and all(isinstance(text, str) for text in negative_prompt))
            ):
                raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}.")
            if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
                raise ValueError(
                    f"`negative_prompt` is a list of {len(negative_prompt)} but `prompt` holds {num_prompts}: pass one "
                    "negative prompt per prompt, or a single string for all of them."
                )
        needs_text_encoder = prompt is not None or negative_prompt is not None
        if needs_text_encoder and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "A text prompt needs the pipeline's optional `text_encoder` and `tokenizer`; without them, pass "
                "`prompt_embeds` (and `negative_prompt_embeds`)."
            )

        check_num_tokens(num_tokens, self.max_num_tokens)
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive int, got {num_images_per_prompt!r}.")
        TokenSampler(guidance_scale, True, temperature, top_k, top_p)  # raises on a bad sampling setting
        check_guidance_scale(decoder_guidance_scale, "decoder_guidance_scale")
        flow_sigmas(num_inference_steps)  # raises on a bad step count
        self.flextok.check_image_size(height, width)
        batch_size = num_prompts * num_images_per_prompt
        check_generators(generator, batch_size, "image", " (prompts or class labels times num_images_per_prompt)")
        factor = self.flextok.config.vae_downsample_factor
        latent_shape = (batch_size, self.flextok.config.latent_channels, height // factor, width // factor)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"`latents` must have shape {latent_shape}, got {tuple(latents.shape)}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """
        Encodes the prompts, and the negative prompts if given, with the text encoder; precomputed embeddings are
        used as they are. Needs only `text_encoder` and `tokenizer` (none of them with embeddings alone).

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompts; or pass `prompt_embeds`.
            num_images_per_prompt (`int`, defaults to 1): copies of each encoding, one per image.
            device (`torch.device`, *optional*): where the encodings go; the pipeline's execution device by default.
            negative_prompt (`str` or `list[str]`, *optional*): one string for every prompt, or one per prompt. "" is
                encoded like any text (for most tokenizers, the special tokens alone); `None` encodes nothing, and
                `ar_model` guides with its learned null text instead.
            prompt_embeds (`torch.Tensor` `[batch, text_length, text_hidden_size]`, *optional*): precomputed last
                hidden states of the text encoder, with their `prompt_attention_mask` `[batch, text_length]` (all
                ones if omitted).
            negative_prompt_embeds, negative_prompt_attention_mask (*optional*): the same for the negative prompts.

        Returns:
            `prompt_embeds` `[batch * num_images_per_prompt, text_length, text_hidden_size]`, `prompt_attention_mask`
            `[batch * num_images_per_prompt, text_length]` (0 on padding), and `negative_prompt_embeds`,
            `negative_prompt_attention_mask` of the same form with their own `text_length` (both `None` without a
            negative prompt). The images of one prompt are adjacent.
        """
        device = device or self._execution_device
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` or `prompt_embeds`.")
        encodes_text = prompt_embeds is None or negative_prompt is not None
        if encodes_text and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "Encoding text needs the pipeline's optional `text_encoder` and `tokenizer`; without them, pass "
                "`prompt_embeds` (and `negative_prompt_embeds`)."
            )
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds, prompt_attention_mask = self._encode_text(prompt, device)
        if negative_prompt is not None:
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompt_embeds)
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negative_prompt, device)

        def per_image(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        return (
            per_image(prompt_embeds),
            per_image(prompt_attention_mask),
            per_image(negative_prompt_embeds),
            per_image(negative_prompt_attention_mask),
        )

    def _encode_text(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.LongTensor]:
        text_inputs = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        attention_mask = text_inputs.attention_mask.to(device)
        outputs = self.text_encoder(text_inputs.input_ids.to(device), attention_mask=attention_mask)
        return outputs.last_hidden_state, attention_mask

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_tokens: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 4.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        decoder_guidance_scale: float = 7.5,
        decoder_norm_guidance: bool = True,
        num_inference_steps: int = 25,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_tokens: bool = False,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> FlexTokPipelineOutput | tuple:
        r"""
        Generates images: samples FlexTok tokens with `ar_model`, then renders them with the FlexTok decoder.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Text prompts; only for a text-conditional `ar_model`, with `text_encoder` and `tokenizer` loaded.
            class_labels (`int` or `list[int]`, *optional*):
                Class ids in [0, `ar_model.config.num_classes`) (ImageNet ids for ImageNet models); only for a
                class-conditional `ar_model`. Pass exactly one of `prompt`, `prompt_embeds` and `class_labels`.
            negative_prompt (`str` or `list[str]`, *optional*):
                What the images should not show; only with `prompt` or `prompt_embeds`. A string applies to every
                prompt, a list gives one per prompt (its images share it, as with `num_images_per_prompt`). The
                unconditional branch of the token sampler's guidance then uses this text instead of the model's
                learned null text. `""` is encoded as a real (empty) text; `None` keeps the learned null text.
                Ignored when `guidance_scale` is 1.0, as in other diffusers pipelines.
            num_tokens (`int`, *optional*, defaults to the longest sequence, usually 256):
                Tokens per image, 1 to `min(ar_model.config.max_position_embeddings, flextok.config.num_registers)`.
                Generation stops after `num_tokens`: few tokens give a coarse image (layout, main colours), more
                tokens add detail; sampling time grows with `num_tokens`.
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt or class label; the images of one condition are adjacent in the output.
            guidance_scale (`float`, defaults to 4.0):
                Classifier-free guidance of the token sampler, finite and >= 0: logits = u + s * (c - u), with u from
                the model's learned null class / null text, or from `negative_prompt`. 1.0 disables it (and its extra
                forward pass).
            temperature (`float`, defaults to 1.0):
                Divides the guided logits before sampling; lower is more conservative.
            top_k (`int`, *optional*):
                Samples among the k most likely tokens only.
            top_p (`float`, *optional*):
                Samples from the smallest set of tokens whose probability reaches top_p (nucleus sampling).
            decoder_guidance_scale (`float`, defaults to 7.5):
                Guidance of the FlexTok rectified-flow decoder toward the tokens, finite and >= 0; 1.0 disables it.
            decoder_norm_guidance (`bool`, defaults to `True`):
                Use adaptive projected guidance (APG, arXiv 2410.02416) in the decoder, with the released sampler's
                settings, instead of plain classifier-free guidance; it tolerates high guidance scales without
                oversaturation.
            num_inference_steps (`int`, defaults to 25):
                Steps of the decoder from noise to image, at the noise levels i / `num_inference_steps`: as many
                decoder evaluations with an Euler `scheduler`, 2 * `num_inference_steps` - 1 with a Heun one.
            height (`int`, *optional*, defaults to `flextok.config.image_size`):
                Image height in pixels, a multiple of `flextok.config.image_multiple`.
            width (`int`, *optional*, defaults to `flextok.config.image_size`):
                Image width in pixels, a multiple of `flextok.config.image_multiple`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Drives both the token sampling and the decoder's initial noise, for reproducible images. A list gives
                one generator per image (batch size times `num_images_per_prompt`): each image then depends only on
                its own generator, and equals the image of a batch of one with that generator. The batch is still
                sampled in one loop.
            latents (`torch.Tensor` `[batch * num_images_per_prompt, latent_channels, height / f, width / f]`,
                *optional*):
                The decoder's initial noise; drawn from `generator` if not given.
            prompt_embeds (`torch.Tensor` `[batch, text_length, text_hidden_size]`, *optional*):
                Precomputed last hidden states of the text encoder (see `encode_prompt`), instead of `prompt`; the
                pipeline then needs no `text_encoder` or `tokenizer`.
            prompt_attention_mask (`torch.Tensor` `[batch, text_length]`, *optional*):
                1 for text tokens, 0 for padding; all ones if omitted.
            negative_prompt_embeds, negative_prompt_attention_mask (`torch.Tensor`, *optional*):
                The same for the negative prompts, one per prompt, of any text length; instead of `negative_prompt`.
            output_type (`str`, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image.Image`), `"np"` (`np.ndarray` `[batch, height, width, 3]` in [0, 1]),
                `"pt"` (`torch.Tensor` `[batch, 3, height, width]` in [0, 1]) or `"latent"` (the sampled VAE latents,
                not decoded).
            return_dict (`bool`, defaults to `True`):
                Return a [`FlexTokPipelineOutput`] instead of a tuple.
            return_tokens (`bool`, defaults to `False`):
                Also return the sampled token ids `[batch, num_tokens]`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of each denoising step as `callback_on_step_end(self, step, timestep,
                callback_kwargs)`, with the tensors named in `callback_on_step_end_tensor_inputs`; the tensors it
                returns in its dict replace them.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                The tensors the callback gets, among `._callback_tensor_inputs`.

        Examples:

        Returns:
            [`FlexTokPipelineOutput`] with `images` (and `tokens` if `return_tokens`), or, if `return_dict` is False,
            the tuple `(images,)`, or `(images, tokens)` if `return_tokens`.
        """
        num_tokens = self.max_num_tokens if num_tokens is None else num_tokens
        height = self.flextok.config.image_size if height is None else height
        width = self.flextok.config.image_size if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        self.check_inputs(
            prompt,
            class_labels,
            negative_prompt,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            num_tokens,
            num_images_per_prompt,
            guidance_scale,
            temperature,
            top_k,
            top_p,
            decoder_guidance_scale,
            num_inference_steps,
            height,
            width,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        batch_size = self._num_prompts(prompt, prompt_embeds, class_labels) * num_images_per_prompt

        # 2. Encode the condition (and the negative prompt, which only guidance uses)
        if class_labels is None:
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
                self.encode_prompt(
                    prompt,
                    num_images_per_prompt,
                    device,
                    negative_prompt if guidance_scale != 1.0 else None,
                    prompt_embeds,
                    prompt_attention_mask,
                    negative_prompt_embeds,
                    negative_prompt_attention_mask,
                )
            )
            condition = {
                "encoder_hidden_states": prompt_embeds,
                "encoder_attention_mask": prompt_attention_mask,
                "negative_encoder_hidden_states": negative_prompt_embeds,
                "negative_encoder_attention_mask": negative_prompt_attention_mask,
            }
        else:
            class_labels = torch.tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            condition = {"class_labels": class_labels.repeat_interleave(num_images_per_prompt)}

        # 3. Generate the token sequences, coarse to fine; a list of generators gives each image its own
        with self.progress_bar(total=num_tokens) as progress_bar:
            tokens = self.ar_model.generate_tokens(
                **condition,
                num_tokens=num_tokens,
                guidance_scale=guidance_scale,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                callback_on_token=lambda index, tokens_so_far: progress_bar.update(),
            )

        # 4. Prepare the decoder's registers and its initial noise (the generator's next draws)
        codes, keep_k = self.flextok.prepare_registers(tokens)
        latents = self.flextok.prepare_latents(batch_size, height, width, generator, device, latents)

        # 5. Denoising loop from noise to VAE latents, one decoder evaluation per time step (Heun: two per step), the
        # decoder told the scheduler's sigmas
        set_flow_timesteps(self.scheduler, num_inference_steps, device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        guidance = FlowGuidance(decoder_guidance_scale, "apg" if decoder_norm_guidance else "cfg")
        momentum_buffer = guidance.new_momentum_buffer()
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = self.scheduler.sigmas[i].item()
                velocity = self.flextok.guided_velocity(latents, sigma, codes, keep_k, guidance, momentum_buffer)
                latents = self.scheduler.step(velocity, t, latents).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Decode the latents with the VAE, then post-process
        if output_type == "latent":
            images = latents
        else:
            images = self.flextok.decode_latents(latents)
            images = self.image_processor.postprocess(images.float(), output_type=output_type)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (images, tokens) if return_tokens else (images,)
        return FlexTokPipelineOutput(images=images, tokens=tokens if return_tokens else None)
