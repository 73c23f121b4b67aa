"""Streamed training data: every source kind on disk, corrupt and tiny images skipped and counted, augmentation,
rank splits and exact resume."""

import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import PIL.ExifTags
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from flextok_hf.training.data import SkipCounter, build_image_stream, collate_images, preprocess_image
from flextok_hf.training.demo_data import HELD_OUT_PHOTOS, SHAPES, build_demo_image_folder

NUM_GOOD = 6


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def samples():
    """NUM_GOOD good images, two corrupt files and one image smaller than the minimum size."""
    good = [(f"{i:03d}", png_bytes(i), i % 3, f"picture {i}") for i in range(NUM_GOOD)]
    bad = [("bad0", os.urandom(64), 0, "noise"), ("bad1", b"\x89PNG truncated", 1, "noise")]
    tiny = [("tiny", png_bytes(99, size=(8, 8)), 2, "tiny")]
    return good + bad + tiny


def write_folder(root):
    for key, data, label, _ in samples():
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.png").write_bytes(data)
    return str(root)


def write_webdataset(root):
    root.mkdir()
    rows = samples()
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for key, data, label, caption in rows[shard::2]:
                for name, payload in [
                    (f"{key}.png", data),
                    (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps({"label": label}).encode()),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / "shard-*.tar")


def write_parquet(root):
    root.mkdir()
    rows = samples()
    for shard in range(2):
        part = rows[shard::2]
        table = pa.table(
            {
                "image": [{"bytes": data, "path": None} for _, data, _, _ in part],
                "label": [label for _, _, label, _ in part],
                "caption": [caption for _, _, _, caption in part],
            }
        )
        pq.write_table(table, root / f"part-{shard}.parquet")
    return str(root / "*.parquet")


WRITERS = {"imagefolder": write_folder, "webdataset": write_webdataset, "parquet": write_parquet}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_source_streams_good_images_and_counts_bad_ones(tmp_path, kind):
    source = WRITERS[kind](tmp_path / kind)
    stats = SkipCounter()
    stream = build_image_stream(source, resolution=16, min_image_size=16, stats=stats)
    examples = list(stream)
    assert len(examples) == NUM_GOOD
    assert stats.as_dict() == {"images_seen": NUM_GOOD + 3, "skipped_corrupt": 2, "skipped_small": 1}
    for example in examples:
        assert example["pixel_values"].shape == (3, 16, 16)
        assert -1 <= example["pixel_values"].min() and example["pixel_values"].max() <= 1
    if kind != "imagefolder":
        assert sorted(e["caption"] for e in examples) == sorted(f"picture {i}" for i in range(NUM_GOOD))
    if kind == "parquet":
        assert sorted(e["label"] for e in examples) == sorted(i % 3 for i in range(NUM_GOOD))
    batch = collate_images(examples[:4])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert len(batch["keys"]) == 4


def test_imagefolder_subfolders_are_labels(tmp_path):
    examples = list(build_image_stream(write_folder(tmp_path / "folder"), resolution=16, min_image_size=16))
    assert {e["label"] for e in examples} == {0, 1, 2}


def test_split_folders_holding_images_directly_stream(tmp_path):
    for split, seeds in (("train", (0, 1)), ("val", (2, 3, 4))):
        (tmp_path / split).mkdir()
        for seed in seeds:
            (tmp_path / split / f"{seed}.png").write_bytes(png_bytes(seed))
    examples = list(build_image_stream(str(tmp_path), "train", resolution=16))  # `datasets` gives them label None
    assert len(examples) == 2 and all("label" not in e for e in examples)


def test_ranks_read_disjoint_data_that_covers_the_set(tmp_path):
    source = write_webdataset(tmp_path / "wds")
    keys = [{e["key"] for e in build_image_stream(source, resolution=16, rank=r, world_size=2)} for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == NUM_GOOD + 1  # the tiny image passes without a minimum size


def test_augmentation_is_seeded_by_run_and_key():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))

    def crop(seed_text):
        return preprocess_image(image, 16, True, True, random.Random(seed_text))

    assert np.array_equal(crop("0:a"), crop("0:a"))
    assert any(not np.array_equal(crop("0:a"), crop(f"0:{key}")) for key in "bcdefgh")
    center = preprocess_image(image, 16, False, False, random.Random(0))
    assert np.array_equal(center, preprocess_image(image, 16, False, False, random.Random(1)))


def test_skips_are_counted_in_dataloader_workers(tmp_path):
    stats = SkipCounter()
    stream = build_image_stream(write_webdataset(tmp_path / "wds"), resolution=16, min_image_size=16, stats=stats)
    loader = StatefulDataLoader(stream, batch_size=2, collate_fn=collate_images, num_workers=2)
    assert sum(len(batch["keys"]) for batch in loader) == NUM_GOOD
    assert stats.as_dict() == {"images_seen": NUM_GOOD + 3, "skipped_corrupt": 2, "skipped_small": 1}


def test_each_pass_gets_new_crops_and_flips_reproducibly(tmp_path):
    source = write_parquet(tmp_path / "parquet")

    def pixels(epoch):
        stream = build_image_stream(source, resolution=16, random_crop=True, random_flip=True, seed=3)
        stream.set_epoch(epoch)
        return {example["key"]: example["pixel_values"] for example in stream}

    first, second = pixels(0), pixels(1)
    assert first.keys() == second.keys()
    assert any(not np.array_equal(first[key], second[key]) for key in first)
    assert all(np.array_equal(second[key], again) for key, again in pixels(1).items())


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset"])
def test_shuffle_draws_the_order_from_the_seed(tmp_path, kind):
    source = WRITERS[kind](tmp_path / kind)

    def keys(**kwargs):
        return [example["key"] for example in build_image_stream(source, resolution=16, **kwargs)]

    in_order = keys()
    shuffled = {seed: keys(shuffle=True, seed=seed) for seed in range(4)}
    assert shuffled[0] == keys(shuffle=True, seed=0)
    assert all(sorted(order) == sorted(in_order) for order in shuffled.values())
    assert any(order != in_order for order in shuffled.values())


def test_camera_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, 8:] = 255  # stored with the bright half on the right ...
    exif = PIL.Image.Exif()
    exif[PIL.ExifTags.Base.Orientation] = 3  # ... and to be shown rotated by 180 degrees
    (tmp_path / "photos").mkdir()
    PIL.Image.fromarray(pixels).save(tmp_path / "photos" / "upside_down.jpg", exif=exif, quality=95)
    (example,) = build_image_stream(str(tmp_path / "photos"), resolution=16)
    assert example["pixel_values"][:, :, :8].mean() > 0.9 and example["pixel_values"][:, :, 8:].mean() < -0.9


@pytest.mark.parametrize("kind, shuffle, epoch", [("parquet", False, 0), ("imagefolder", True, 1)])
def test_stream_resumes_exactly_from_its_state(tmp_path, kind, shuffle, epoch):
    source = WRITERS[kind](tmp_path / kind)

    def build():
        stream = build_image_stream(source, resolution=16, random_crop=True, random_flip=True, seed=3, shuffle=shuffle)
        stream.set_epoch(epoch)
        return stream

    stream = build()
    iterator = iter(stream)
    first = [next(iterator) for _ in range(2)]
    state = stream.state_dict()
    rest = list(iterator)

    resumed = build()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert [e["key"] for e in again] == [e["key"] for e in rest] and len(first) + len(rest) == 7
    assert all(np.array_equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(again, rest, strict=True))


def test_missing_sources_and_columns_are_reported(tmp_path):
    with pytest.raises(ValueError, match="No files match"):
        build_image_stream(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="no image column 'photo'"):
        build_image_stream(write_parquet(tmp_path / "parquet"), image_column="photo")


def test_demo_image_folder_keeps_held_out_photos_out_of_training(tmp_path):
    root = build_demo_image_folder(tmp_path / "demo", num_train=12, resolution=32, seed=1)
    train = sorted((root / "train").glob("*.png"))
    test = {p.stem for p in (root / "test").glob("*.png")}
    assert len(train) == 12 and set(HELD_OUT_PHOTOS) <= test
    assert PIL.Image.open(train[0]).size == (32, 32)
    assert len(list(build_image_stream(str(root / "train"), resolution=32))) == 12


def test_demo_image_folder_with_classes_reads_with_labels(tmp_path):
    root = build_demo_image_folder(tmp_path / "demo", num_train=40, resolution=32, seed=1, class_folders=True)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert set(SHAPES) <= set(classes) and not set(HELD_OUT_PHOTOS) & set(classes)
    assert not list((root / "train").glob("*.png"))
    labels = {example["key"]: example["label"] for example in build_image_stream(str(root / "train"), resolution=32)}
    assert len(labels) == 40
    for key, label in labels.items():  # class ids number the sorted folder names
        assert Path(key).parent.name == classes[label]
