"""Stage 2: the autoregressive generator over FlexTok tokens, class- or text-conditional."""

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import AutoModel, AutoTokenizer

from ..configuration_flextok_ar import FlexTokARConfig
from ..modeling_flextok import FlexTokModel
from ..modeling_flextok_ar import FlexTokARModel
from .config import TrainingConfig, check_model_settings
from .pretokenize import completed_shards


@dataclass
class ARTrainingConfig(TrainingConfig):
    """Train a FlexTok AR generator on pre-tokenised data (`training/pretokenize.py`) or on images.

    `token_data` is the folder of parquet shards that pretokenize.py wrote; instead, `train_data` names images (any
    source of the tokenizer's training, with their labels or captions) that the frozen tokenizer
    `tokenizer_name_or_path` tokenises on the fly, at `resolution`. `model` holds `FlexTokARConfig`
    arguments (its `vocab_size` must be the tokenizer's codebook size); `pretrained_model_name_or_path` resumes from
    a saved generator instead. A text-conditional model (`model.text_hidden_size` set) needs
    `text_encoder_name_or_path` (any transformers text encoder and its tokenizer) and captions in the data.
    `tokenizer_name_or_path` names the FlexTok tokenizer of the tokens, for `export_pipeline` too.
    """

    model: dict[str, Any] = field(default_factory=dict)
    pretrained_model_name_or_path: str | None = None
    token_data: str | None = None
    use_flipped_tokens: bool = True
    text_encoder_name_or_path: str | None = None
    text_max_length: int = 77
    tokenizer_name_or_path: str | None = None
    export_pipeline: bool = False
    learning_rate: float = 3e-4
    adam_beta2: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        if (self.token_data is None) == (self.train_data is None):
            raise ValueError(
                "Set one of token_data (the folder of parquet shards written by training/pretokenize.py) or "
                "train_data (images, tokenised on the fly by tokenizer_name_or_path)."
            )
        if self.train_data is not None and not self.tokenizer_name_or_path:
            raise ValueError(
                "train_data needs tokenizer_name_or_path, the FlexTok tokenizer that tokenises the images."
            )
        if self.export_pipeline and not self.tokenizer_name_or_path:
            raise ValueError("export_pipeline needs tokenizer_name_or_path (the FlexTok tokenizer of the tokens).")


def build_ar_model(config: ARTrainingConfig) -> FlexTokARModel:
    if config.pretrained_model_name_or_path:
        model = FlexTokARModel.from_pretrained(config.pretrained_model_name_or_path)
    else:
        check_model_settings(config.model, {f.name for f in dataclasses.fields(FlexTokARConfig)}, "FlexTokARConfig")
        model = FlexTokARModel(FlexTokARConfig(**config.model))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


def build_token_stream(config: ARTrainingConfig, rank: int, world_size: int):
    """Part `rank` of `world_size` of the pre-tokenised shards, as a resumable stream (examples for
    [`collate_tokens`]). With `use_flipped_tokens`, an example's mirrored ids replace its ids in half of the passes,
    drawn from the seed, the pass (`set_epoch`) and the example's key, so that a resumed run draws the same."""
    files = [str(path) for path in token_shards(config.token_data)]
    dataset = load_dataset("parquet", data_files=files, split="train", streaming=True)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if config.use_flipped_tokens and "token_ids_flipped" in dataset.column_names:

        def choose_orientation(example: dict[str, Any]) -> dict[str, Any]:
            # `stream` is the returned dataset: its epoch is the pass that `set_epoch` started.
            flipped = random.Random(f"{config.seed}:{stream.epoch}:{example['key']}").random() < 0.5
            return {"token_ids": example["token_ids_flipped" if flipped else "token_ids"]}

        dataset = dataset.map(choose_orientation, remove_columns=["token_ids_flipped"])
    stream = dataset
    return stream


def token_shards(token_data: str) -> list[Path]:
    """The parquet shards that training/pretokenize.py wrote into `token_data`, in order."""
    shards = completed_shards(token_data)
    if not shards:
        raise ValueError(f"No shard-*.parquet files in {token_data}: run training/pretokenize.py first.")
    return shards


def check_token_data(config: ARTrainingConfig, model_config: FlexTokARConfig):
    """Refuses pre-tokenised data whose ids or labels the generator cannot embed (read from the first shard), at
    the start rather than as an index error in the first step."""
    shards = token_shards(config.token_data)
    table = pq.read_table(shards[0])
    largest_id = pc.max(pc.list_flatten(table["token_ids"])).as_py()
    if largest_id >= model_config.vocab_size:
        raise ValueError(
            f"{shards[0]} holds token id {largest_id}, but the generator's vocab_size is {model_config.vocab_size}: "
            "set model.vocab_size to the tokenizer's codebook size."
        )
    if "label" in table.column_names and not model_config.is_text_conditional:
        largest_label = pc.max(table["label"]).as_py()
        if largest_label >= model_config.num_classes:
            raise ValueError(
                f"{shards[0]} holds class label {largest_label}, but the generator has num_classes "
                f"{model_config.num_classes}."
            )


def collate_tokens(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Token examples -> `input_ids` `[B, N]`, `keys`, and `class_labels` `[B]` or `captions` when the shards have
    them."""
    batch = {
        "input_ids": torch.tensor([example["token_ids"] for example in examples], dtype=torch.long),
        "keys": [example["key"] for example in examples],
    }
    if "label" in examples[0]:
        batch["class_labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    if "caption" in examples[0]:
        batch["captions"] = [example["caption"] for example in examples]
    return batch


def load_frozen_tokenizer(
    config: ARTrainingConfig, model_config: FlexTokARConfig, device, dtype: torch.dtype = torch.float32
) -> FlexTokModel:
    """The tokenizer that tokenises `train_data` on the fly, frozen, in `dtype`."""
    tokenizer = FlexTokModel.from_pretrained(config.tokenizer_name_or_path, torch_dtype=dtype).to(device).eval()
    if tokenizer.config.codebook_size != model_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.config.codebook_size} token ids but the generator's vocab_size is "
            f"{model_config.vocab_size}."
        )
    if config.resolution != tokenizer.config.image_size:
        raise ValueError(f"resolution must be the tokenizer's image size, {tokenizer.config.image_size}.")
    return tokenizer.requires_grad_(False)


def ar_loss_function(config: ARTrainingConfig, model_config: FlexTokARConfig, accelerator: Accelerator):
    """`(model, batch) -> (loss, logs)` on token batches ([`collate_tokens`]) or, with `train_data`, on image
    batches (`collate_images`) tokenised here; captions go through the frozen text encoder on the fly. The frozen
    tokenizer and text encoder run in the run's mixed precision (they are outside the prepared model)."""
    device = accelerator.device
    text_encoder = tokenizer = None
    if model_config.is_text_conditional:
        if not config.text_encoder_name_or_path:
            raise ValueError("A text-conditional model needs text_encoder_name_or_path.")
        tokenizer = AutoTokenizer.from_pretrained(config.text_encoder_name_or_path)
        text_encoder = AutoModel.from_pretrained(config.text_encoder_name_or_path).to(device).eval()
        text_encoder.requires_grad_(False)
    flextok = None
    if config.train_data is not None:
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        flextok = load_frozen_tokenizer(config, model_config, device, dtype)
    num_tokens = model_config.max_position_embeddings

    def compute_loss(model, batch):
        if flextok is not None:  # an image batch
            with torch.no_grad():
                input_ids = flextok.encode(batch["pixel_values"].to(device, flextok.dtype))
            class_labels = batch.get("labels")
        else:
            input_ids, class_labels = batch["input_ids"], batch.get("class_labels")
        input_ids = input_ids[:, :num_tokens].to(device, non_blocking=True)
        condition = {}
        if text_encoder is not None:
            if "captions" not in batch:
                raise ValueError("A text-conditional model needs captions in the data (caption_column, .txt files).")
            text = tokenizer(
                batch["captions"],
                padding=True,
                truncation=True,
                max_length=config.text_max_length,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad(), accelerator.autocast():
                condition["encoder_hidden_states"] = text_encoder(**text).last_hidden_state
            condition["encoder_attention_mask"] = text.attention_mask
        else:
            if class_labels is None:
                raise ValueError("A class-conditional model needs labels in the data (label_column, class folders).")
            condition["class_labels"] = class_labels.to(device, non_blocking=True)
        output = model(input_ids=input_ids, labels=input_ids, **condition)
        return output.loss, {}

    return compute_loss
