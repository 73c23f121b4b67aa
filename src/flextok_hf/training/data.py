"""Streamed image data for training, with `datasets`: Hub datasets (ImageNet-1k layout: image + label), local
webdataset `.tar` shards (img2dataset layout, as DFN-style data: `<key>.jpg|png|webp`, `<key>.txt` caption,
`<key>.json`), parquet files and image folders.

Images are decoded here, not by `datasets`: one undecodable file would otherwise end the whole stream. Corrupt and
too-small images are skipped and counted ([`SkipCounter`], also from DataLoader worker processes). Augmentations
(resize, random or center crop, horizontal flip) need no torchvision and draw from a generator seeded by the run's
seed, the pass (`set_epoch`) and the example's key: each pass gets new crops and flips, and a resumed run sees
exactly the pixels the interrupted one would have.

Shuffling: `shuffle=True` puts an image folder's images, or the `.tar`/`.parquet` files, in an order drawn from the
seed (an image folder lists its classes one after another); from the second pass on `datasets` also reorders the
shards. Resume: the stream position (through torchdata's `StatefulDataLoader`, workers included) is saved with each
checkpoint. It is exact with these shuffles but not with a shuffle buffer (`shuffle_buffer_size > 0`): `datasets`
refills the buffer on resume and the examples that follow differ.

Ranks: each process streams `split_dataset_by_node(dataset, rank, world_size)`, its own shards when their number
divides evenly, else every `world_size`-th example: the ranks' data is disjoint. Batches are therefore not
`accelerator.prepare`d (that would split or dispatch them a second time).
"""

import glob
import io
import itertools
import logging
import multiprocessing
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from datasets import Image as ImageFeature
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

logger = logging.getLogger(__name__)

FOLDER_SHARDS = 64
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("caption", "txt", "text")
LABEL_COLUMNS = ("label", "cls")


class SkipCounter:
    """Examples this process has read, and those skipped because they could not be decoded or were too small.

    The counts live in shared memory: DataLoader worker processes, which decode the images, add to the counts that
    the training loop logs.
    """

    NAMES = ("images_seen", "skipped_corrupt", "skipped_small")

    def __init__(self):
        self.counts = multiprocessing.Array("q", len(self.NAMES))

    def add(self, name: str):
        with self.counts.get_lock():
            self.counts[self.NAMES.index(name)] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.NAMES, self.counts[:], strict=True))


def load_image_source(source: str, split: str = "train", shuffle_seed: int | None = None) -> IterableDataset:
    """A streaming dataset from a folder of images (`imagefolder`: class subfolders become labels), a glob or list
    of `.tar` shards (`webdataset`) or `.parquet` files, or else a Hub dataset name. With `shuffle_seed`, a folder's
    images, or the files, come in an order drawn from it (a Hub dataset keeps its order)."""
    path = Path(source)
    if path.is_dir():
        # Indexed once (paths into an Arrow cache), then streamed in shards that DataLoader workers and ranks can
        # share out; streaming the folder directly gives a single shard.
        folder = load_dataset("imagefolder", data_dir=source, split=split)
        if shuffle_seed is not None:
            folder = folder.shuffle(seed=shuffle_seed)
        return folder.to_iterable_dataset(num_shards=min(FOLDER_SHARDS, len(folder)))
    files = sorted(glob.glob(source))
    if files:
        kind = "webdataset" if files[0].endswith(".tar") else "parquet" if files[0].endswith(".parquet") else None
        if kind is None:
            raise ValueError(f"{source} matches {files[0]}, neither .tar shards nor .parquet files.")
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(files)
        return load_dataset(kind, data_files=files, split="train", streaming=True)
    if any(char in source for char in "*?[") or path.suffix in (".tar", ".parquet"):
        raise ValueError(f"No files match {source}.")
    if shuffle_seed is not None:
        logger.warning(
            f"{source} streams from the Hub in its stored order on the first pass (datasets reorders its files from "
            "the second): set shuffle_buffer_size, or download its files and pass them as a glob, to shuffle it."
        )
    return load_dataset(source, split=split, streaming=True)


def find_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"The dataset has no {what} column {wanted!r}; its columns are {columns}.")
        return wanted
    return next((name for name in candidates if name in columns), None)


def open_image(encoded: dict[str, Any]) -> PIL.Image.Image:
    """Decodes a `datasets.Image(decode=False)` value (`{"bytes", "path"}`) to an upright RGB image: camera photos
    are often stored on their side with an EXIF orientation, which `datasets` would also apply."""
    file = io.BytesIO(encoded["bytes"]) if encoded.get("bytes") is not None else encoded["path"]
    with PIL.Image.open(file) as image:
        return PIL.ImageOps.exif_transpose(image).convert("RGB")


def preprocess_image(
    image: PIL.Image.Image, resolution: int, random_crop: bool, random_flip: bool, rng: random.Random
) -> np.ndarray:
    """RGB, shorter side resized to `resolution` (bicubic, antialiased), square crop (random or centered), optional
    horizontal flip -> float32 `[3, resolution, resolution]` in [-1, 1]."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, PIL.Image.BICUBIC, reducing_gap=3.0)
    free_x, free_y = image.width - resolution, image.height - resolution
    left, top = (rng.randint(0, free_x), rng.randint(0, free_y)) if random_crop else (free_x // 2, free_y // 2)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pixels.transpose(2, 0, 1)


def build_image_stream(
    source: str,
    split: str = "train",
    resolution: int = 256,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
    min_image_size: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    shuffle_buffer_size: int = 0,
    rank: int = 0,
    world_size: int = 1,
    stats: SkipCounter | None = None,
) -> IterableDataset:
    """Examples `{"pixel_values": float32 [3, R, R] in [-1, 1], "key": str, "label": int?, "caption": str?}` from
    `source` (see [`load_image_source`]); this rank's share only. Columns are found by name (`image`/`jpg`/`png`...,
    `label`/`cls`, `caption`/`txt`) unless given. Call `set_epoch` on the returned stream to start a new pass: it
    reseeds the crops and flips (and reorders the shards)."""
    dataset = load_image_source(source, split, shuffle_seed=seed if shuffle else None)
    columns = list(dataset.column_names or [])
    image_column = find_column(columns, image_column, IMAGE_COLUMNS, "image")
    if image_column is None:
        raise ValueError(
            f"Found no image column in {columns}; name it with image_column (--image-column on the command line)."
        )
    label_column = find_column(columns, label_column, LABEL_COLUMNS, "label")
    caption_column = find_column(columns, caption_column, CAPTION_COLUMNS, "caption")
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    stats = stats if stats is not None else SkipCounter()

    def decode(example: dict[str, Any]) -> dict[str, Any]:
        stats.add("images_seen")
        encoded = example[image_column]
        key = example.get("__key__") or encoded.get("path") or f"{zlib.crc32(encoded['bytes']):08x}"
        output = {"key": key, "pixel_values": None}
        if label_column is not None and example[label_column] is not None:  # None: images right in a split folder
            output["label"] = int(example[label_column])
        if caption_column is not None:
            output["caption"] = str(example[caption_column])
        try:
            image = open_image(encoded)
        except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error... on malformed files
            stats.add("skipped_corrupt")
            return output
        if min(image.size) < min_image_size:
            stats.add("skipped_small")
            return output
        # `stream` is the returned dataset: its epoch is the pass that `set_epoch` started.
        rng = random.Random(f"{seed}:{stream.epoch}:{key}")
        output["pixel_values"] = preprocess_image(image, resolution, random_crop, random_flip, rng)
        return output

    if shuffle_buffer_size > 0:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    dataset = dataset.map(decode, remove_columns=columns)
    stream = dataset.filter(lambda example: example["pixel_values"] is not None)
    return stream


def collate_images(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks `pixel_values` `[B, 3, R, R]`; labels become a LongTensor `[B]`, captions and keys stay lists."""
    batch = {
        "pixel_values": torch.from_numpy(np.stack([example["pixel_values"] for example in examples])),
        "keys": [example["key"] for example in examples],
    }
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    if "caption" in examples[0]:
        batch["captions"] = [example["caption"] for example in examples]
    return batch


def collated_batches(examples, batch_size: int):
    """Batches of up to `batch_size` examples of a stream, each collated by [`collate_images`]."""
    iterator = iter(examples)
    while chunk := list(itertools.islice(iterator, batch_size)):
        yield collate_images(chunk)


def build_training_stream(config, rank: int, world_size: int, stats: SkipCounter | None = None) -> IterableDataset:
    """Part `rank` of `world_size` of the training images of a [`~flextok_hf.training.config.TrainingConfig`]
    (examples for [`collate_images`]); skipped images are counted in `stats`."""
    if config.train_data is None:
        raise ValueError("train_data must name the training images (a folder, a .tar/.parquet glob or a Hub name).")
    return build_image_stream(
        config.train_data,
        split=config.dataset_split,
        resolution=config.resolution,
        image_column=config.image_column,
        label_column=config.label_column,
        caption_column=config.caption_column,
        random_crop=config.random_crop,
        random_flip=config.random_flip,
        min_image_size=config.min_image_size,
        seed=config.seed,
        shuffle=True,
        shuffle_buffer_size=config.shuffle_buffer_size,
        rank=rank,
        world_size=world_size,
        stats=stats,
    )
