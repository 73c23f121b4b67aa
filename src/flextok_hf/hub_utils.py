"""Model cards for what flextok-hf saves and pushes: the tokenizer, the AR generator, the pipeline and a VAE."""

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

PAPER = "https://arxiv.org/abs/2502.13967"

USAGE = {
    "FlexTokModel": """```python
from flextok_hf import FlexTokModel

model = FlexTokModel.from_pretrained("{repo_id}")
token_ids = model.encode(images)  # [B, 3, H, W] in [-1, 1] -> [B, {num_tokens}] ids, coarse to fine
images = model.decode(token_ids[:, :16], output_type="pil").images  # any prefix decodes
```""",
    "FlexTokARModel": """```python
from flextok_hf import FlexTokARModel

model = FlexTokARModel.from_pretrained("{repo_id}")
tokens = model.generate_tokens(class_labels=torch.tensor([207]), num_tokens=64, guidance_scale=4.0)
```""",
    "FlexTokPipeline": """```python
from flextok_hf import FlexTokPipeline

pipe = FlexTokPipeline.from_pretrained("{repo_id}")
images = pipe({condition}, num_tokens=64).images
```""",
    "AutoencoderKL": """```python
from diffusers import AutoencoderKL

vae = AutoencoderKL.from_pretrained("{repo_id}")  # the VAE a FlexTok tokenizer is trained on
```""",
}


def create_model_card(
    model: Any,
    repo_id: str = "path/to/this/folder",
    base_model: str | None = None,
    training: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for a `FlexTokModel`, `FlexTokARModel`, `FlexTokPipeline` or diffusers `AutoencoderKL`: Hub
    metadata (`library_name`, tags, `pipeline_tag`, `base_model`), what the model is, how to load it, and, for a
    trained model, how it was trained (`training`: data, steps, final metrics...)."""
    kind = type(model).__name__
    if kind not in USAGE:
        raise ValueError(f"No model card for {kind}; expected one of {sorted(USAGE)}.")
    text_conditional = kind == "FlexTokPipeline" and model.ar_model.config.is_text_conditional
    pipeline_tag = {
        "FlexTokModel": "image-to-image",
        "AutoencoderKL": "image-to-image",
        "FlexTokARModel": "text-to-image" if getattr(model.config, "is_text_conditional", False) else None,
        "FlexTokPipeline": "text-to-image" if text_conditional else "unconditional-image-generation",
    }[kind]
    data = ModelCardData(
        library_name="diffusers" if kind in ("FlexTokPipeline", "AutoencoderKL") else "transformers",
        tags=["flextok", "flextok-hf", "image-tokenizer" if kind == "FlexTokModel" else "image-generation"],
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        license="apache-2.0",
    )
    num_tokens = model.config.num_registers if kind == "FlexTokModel" else 256
    condition = '"a photo of a lighthouse"' if text_conditional else "class_labels=[207]"
    usage = USAGE[kind].format(repo_id=repo_id, num_tokens=num_tokens, condition=condition)
    sections = [
        f"# {kind} (flextok-hf)",
        f"FlexTok ([Bachmann et al. 2025]({PAPER})) resamples an image into an ordered sequence of 1 to 256 discrete "
        "tokens; any prefix decodes to a plausible image, coarse to fine. Install with `pip install flextok-hf`.",
        "## Usage",
        usage,
    ]
    if base_model:
        sections.append(f"Fine-tuned from `{base_model}`.")
    if training:
        sections += ["## Training", "```json", json.dumps(training, indent=2, default=str), "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
