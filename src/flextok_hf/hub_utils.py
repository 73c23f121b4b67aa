"""Model cards for FlexTok's models and pipeline, and the save / push plumbing that writes them.

`create_model_card(obj, ...)` builds a huggingface_hub `ModelCard` (metadata + description + usage code) for a
`FlexTokModel`, `FlexTokARModel`, `FlexTokPipeline` or the `AutoencoderKL` a tokenizer trains on; training scripts
pass `datasets`, `training_steps` and `metrics`. `ModelCardMixin` makes `save_pretrained` write that card as
README.md and `push_to_hub` upload exactly what `save_pretrained` wrote: transformers' and diffusers' own
`push_to_hub` replace README.md by a generic card.
"""

import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData

PAPER_TAG = "arxiv:2502.13967"
# Arguments of `save_pretrained(..., push_to_hub=True, ...)` that concern the upload, not the files.
UPLOAD_KWARGS = ("repo_id", "token", "private", "commit_message", "commit_description", "revision", "create_pr")


def _hub_repo_id(name_or_path) -> str | None:
    """`name_or_path` if it names a Hub repo (owner/name) rather than a local folder, else None."""
    name = str(name_or_path or "")
    return name if name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/")) else None


def _generation_task(ar_config) -> str:
    return "text-to-image" if ar_config.is_text_conditional else "unconditional-image-generation"


def _tokenizer_description(model, repo_id: str) -> tuple[str, str, str, str]:
    config, side = model.config, model.config.image_size
    prefix = min(16, config.num_registers)
    title = "FlexTok tokenizer"
    summary = (
        f"A [FlexTok](https://arxiv.org/abs/2502.13967) image tokenizer: a {side}x{side} "
        f"image becomes an ordered sequence of 1 to {config.num_registers} discrete tokens (vocabulary "
        f"{config.codebook_size:,}, FSQ levels {config.fsq_levels}), coarse to fine; any prefix decodes to an image "
        f"with a rectified-flow decoder. Encoder: {config.encoder_num_layers} layers of width "
        f"{config.encoder_hidden_size}; decoder: {config.decoder_num_layers} layers of width "
        f"{config.decoder_hidden_size}."
    )
    usage = f"""import torch
from flextok_hf import FlexTokModel

model = FlexTokModel.from_pretrained("{repo_id}")
token_ids = model.encode(images)  # [B, 3, {side}, {side}] in [-1, 1] -> [B, {config.num_registers}], coarse to fine
generator = torch.Generator().manual_seed(0)
reconstructions = model.decode(token_ids[:, :{prefix}], generator=generator).images  # from {prefix} tokens"""
    return title, summary, usage, "image-to-image"


def _generator_description(model, repo_id: str) -> tuple[str, str, str, str]:
    config = model.config
    condition = (
        f"the hidden states of a text encoder (width {config.text_hidden_size})"
        if config.is_text_conditional
        else f"one of {config.num_classes} class labels"
    )
    title = "FlexTok autoregressive generator"
    summary = (
        f"A decoder-only transformer ({config.num_hidden_layers} layers of width {config.hidden_size}) that samples "
        f"[FlexTok](https://arxiv.org/abs/2502.13967) image tokens (vocabulary {config.vocab_size:,}, up to "
        f"{config.max_position_embeddings} tokens), coarse to fine, given {condition}. A FlexTok tokenizer's decoder "
        "renders the tokens into an image; `FlexTokPipeline` does both."
    )
    num_tokens = min(32, config.max_position_embeddings)
    condition_arguments = (
        "encoder_hidden_states=text_states, encoder_attention_mask=text_mask"  # a text encoder's outputs
        if config.is_text_conditional
        else f"class_labels=torch.tensor({list(range(min(2, config.num_classes)))})"
    )
    usage = f"""import torch
from flextok_hf import FlexTokARModel

model = FlexTokARModel.from_pretrained("{repo_id}")
token_ids = model.generate_tokens({condition_arguments}, num_tokens={num_tokens})  # [batch, {num_tokens}]"""
    return title, summary, usage, _generation_task(config)


def _vae_description(vae, repo_id: str) -> tuple[str, str, str, str]:
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    title = "VAE for FlexTok"
    summary = (
        f"A diffusers `AutoencoderKL` ({config.latent_channels} latent channels, {factor}x downsampling, latents "
        f"scaled by {config.scaling_factor:g}), the frozen autoencoder a [FlexTok](https://arxiv.org/abs/2502.13967) "
        "tokenizer is trained on: pass it to training/train_tokenizer.py as `--vae_name_or_path`."
    )
    usage = f"""from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained("{repo_id}")
latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor  # images [B, 3, H, W] in [-1, 1]"""
    return title, summary, usage, "image-to-image"


def _pipeline_description(pipeline, repo_id: str) -> tuple[str, str, str, str]:
    ar_config, tokenizer_config = pipeline.ar_model.config, pipeline.flextok.config
    title = "FlexTok pipeline"
    condition = "a text prompt" if ar_config.is_text_conditional else "a class label"
    summary = (
        f"A diffusers pipeline that generates {tokenizer_config.image_size}x{tokenizer_config.image_size} images "
        f"from {condition} with [FlexTok](https://arxiv.org/abs/2502.13967): an autoregressive model samples 1 to "
        f"{pipeline.max_num_tokens} tokens, coarse to fine, and the FlexTok tokenizer's rectified-flow decoder "
        "renders them. Few tokens give a coarse image, more tokens add detail."
    )
    if ar_config.is_text_conditional:
        prompt = '"a lighthouse at night"'
    else:
        prompt = f"class_labels={list(range(min(2, ar_config.num_classes)))}"
    usage = f"""import torch
from flextok_hf import FlexTokPipeline

pipe = FlexTokPipeline.from_pretrained("{repo_id}")
generator = torch.Generator().manual_seed(0)
images = pipe({prompt}, num_tokens={min(32, pipeline.max_num_tokens)}, generator=generator).images"""
    return title, summary, usage, _generation_task(ar_config)


def create_model_card(
    obj,
    repo_id: str | None = None,
    *,
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    training_steps: int | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """A model card for a `FlexTokModel`, `FlexTokARModel`, `FlexTokPipeline` or a FlexTok VAE (`AutoencoderKL`).

    Args:
        obj: the model or pipeline; its config gives the description, the task (`pipeline_tag`) and the usage code.
        repo_id (`str`, *optional*): where it will live, for the usage code.
        base_model (`str` or `list[str]`, *optional*): what it was converted or fine-tuned from; by default the Hub
            repos it (or, for a pipeline, each component) was loaded from, other than `repo_id`.
        datasets, training_steps, metrics (*optional*): how it was trained and how it scores, for training scripts;
            `metrics` maps a metric's name to its value.
        license, tags (*optional*): card metadata; FlexTok's own tags and a model's `model_tags` are added.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline  # not at the top: modeling modules import this one

    if isinstance(obj, DiffusionPipeline):
        describe, library = _pipeline_description, "diffusers"
        sources = [obj.name_or_path] + [getattr(obj, name).name_or_path for name in ("flextok", "ar_model")]
    elif isinstance(obj, AutoencoderKL):
        describe, library, sources = _vae_description, "diffusers", [obj.config.get("_name_or_path")]
    else:
        describe = {"flextok": _tokenizer_description, "flextok_ar": _generator_description}[obj.config.model_type]
        library, sources = "transformers", [obj.name_or_path]
    title, summary, usage, task = describe(obj, repo_id or "path/to/this/folder")
    model_tags = getattr(obj, "model_tags", None) or []  # transformers' `add_model_tags`
    if base_model is None:
        base_model = list(dict.fromkeys(s for s in map(_hub_repo_id, sources) if s not in (None, repo_id))) or None

    sections = [f"# {title}", summary, f"## Usage\n\nNeeds `pip install flextok-hf`.\n\n```python\n{usage}\n```"]
    if datasets or training_steps is not None or metrics:
        lines = [f"- data: {', '.join(datasets)}"] if datasets else []
        lines += [f"- training steps: {training_steps:,}"] if training_steps is not None else []
        lines += [f"- {name}: {value:g}" for name, value in (metrics or {}).items()]
        sections.append("## Training\n\n" + "\n".join(lines))
    data = ModelCardData(
        library_name=library,
        pipeline_tag=task,
        tags=list(dict.fromkeys(["flextok", "image-tokenizer", PAPER_TAG, *(tags or []), *model_tags])),
        base_model=base_model,
        datasets=datasets,
        license=license,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


class ModelCardMixin:
    """For FlexTok's models and pipeline (listed before `PreTrainedModel` / `DiffusionPipeline` in the bases):
    `save_pretrained` also writes `create_model_card(self)` as README.md, and `push_to_hub` uploads what
    `save_pretrained` writes, card included."""

    def save_pretrained(
        self, save_directory, *args, push_to_hub: bool = False, variant=None, max_shard_size=None, **kwargs
    ):
        # Named, not left in kwargs: a diffusers pipeline passes them only to components whose signature names them.
        kwargs.update(
            {k: v for k, v in {"variant": variant, "max_shard_size": max_shard_size}.items() if v is not None}
        )
        upload_kwargs = {key: kwargs.pop(key) for key in UPLOAD_KWARGS if key in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        create_model_card(self, upload_kwargs.get("repo_id")).save(os.path.join(save_directory, "README.md"))
        if push_to_hub:
            upload_kwargs.setdefault("repo_id", Path(save_directory).name)
            upload_saved_folder(save_directory, **upload_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs,
    ) -> CommitInfo:
        """Saves into a temporary folder with `save_pretrained(**save_kwargs)` (model card included) and uploads
        it to the Hub repo `repo_id`, created if needed. Returns the commit's info."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, **save_kwargs)
            return upload_saved_folder(
                folder,
                repo_id,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


class StrictLoadingMixin:
    """For FlexTok's models (listed before `PreTrainedModel` in the bases): `from_pretrained` raises a `ValueError`
    when the checkpoint lacks weights of the model its config describes. transformers only reports them and
    initialises them at random: wrong tokens and images, unnoticed. Weights a model rebuilds or may add new match its
    `_keys_to_ignore_on_load_missing` patterns."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs):
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        missing = sorted(loading_info["missing_keys"])
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(
                f"{pretrained_model_name_or_path} is missing {len(missing)} weights of the {cls.__name__} its config "
                f"describes: {shown}."
            )
        return (model, loading_info) if output_loading_info else model


def upload_saved_folder(folder, repo_id: str, private: bool | None = None, token=None, **commit_kwargs) -> CommitInfo:
    """Creates the Hub repo `repo_id` if needed and commits the content of `folder` to it."""
    api = HfApi(token=token)  # made per call, so it reads the endpoint configured now
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=folder, **commit_kwargs)
