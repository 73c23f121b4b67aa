"""Pre-tokenisation for stage 2: images -> FlexTok token ids, written as parquet shards that `datasets` loads.

Each shard `shard-<index>.parquet` holds `shard_size` rows: `token_ids` (the tokenizer's `num_registers` ids, uint16
when the vocabulary fits, else int32), `label` and/or `caption` when the source has them, `key` (the source id),
and `token_ids_flipped` (the ids of the mirrored image) with `flip=True`. A shard is written under a temporary name
and renamed when complete, so a killed run keeps its finished shards; each records in its parquet metadata the
stream's position after its last example, from which a resumed run goes on without decoding what came before.
"""

import itertools
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import IterableDataset
from tqdm.auto import tqdm

from ..modeling_flextok import FlexTokModel
from .data import collated_batches

SHARD_PATTERN = "shard-{:05d}.parquet"
STREAM_STATE_KEY = b"flextok_hf.stream_state"  # parquet metadata: the stream's `state_dict()` after the shard


def completed_shards(output_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(output_dir).glob("shard-*.parquet"))


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 2**16 else pa.int32()


@torch.no_grad()
def pretokenize(
    model: FlexTokModel,
    examples: IterableDataset,
    output_dir: str | os.PathLike,
    shard_size: int = 4096,
    batch_size: int = 64,
    flip: bool = False,
    max_examples: int | None = None,
) -> list[Path]:
    """Tokenizes `examples` (a stream from [`~flextok_hf.training.data.build_image_stream`]: `pixel_values`
    `[3, H, W]` in [-1, 1], `key`, optional `label` and `caption`) into parquet shards in `output_dir`, at most
    `max_examples` rows in all. With shards already there (a resumed run) the stream goes on from where the last one
    ended. Returns every shard of the dataset."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size}).")
    shards = completed_shards(output_dir)
    written = sum(pq.read_metadata(path).num_rows for path in shards)
    if shards:
        metadata = pq.read_schema(shards[-1]).metadata or {}
        if STREAM_STATE_KEY not in metadata:
            raise ValueError(f"{shards[-1]} records no stream position to resume from: delete the shards to redo them.")
        examples.load_state_dict(json.loads(metadata[STREAM_STATE_KEY]))
    total = None if max_examples is None else max(max_examples - written, 0)
    ids_type = token_dtype(model.config.codebook_size)
    shard: dict[str, list] = {}
    progress = tqdm(total=total, desc="Tokenizing", unit="img")
    shard_index = len(shards)
    for batch in collated_batches(itertools.islice(examples, total), batch_size):
        images = batch["pixel_values"].to(model.device, model.dtype)
        columns = {"key": batch["keys"], "label": batch.get("labels"), "caption": batch.get("captions")}
        columns["token_ids"] = model.encode(images).cpu()
        if flip:
            columns["token_ids_flipped"] = model.encode(images.flip(-1)).cpu()
        for name, values in columns.items():
            if values is not None:
                shard.setdefault(name, []).extend(values.tolist() if isinstance(values, torch.Tensor) else values)
        progress.update(len(batch["keys"]))
        if len(shard["key"]) == shard_size:
            write_shard(shard, output_dir / SHARD_PATTERN.format(shard_index), ids_type, examples.state_dict())
            shard, shard_index = {}, shard_index + 1
    if shard:
        write_shard(shard, output_dir / SHARD_PATTERN.format(shard_index), ids_type, examples.state_dict())
    progress.close()
    return completed_shards(output_dir)


def write_shard(columns: dict[str, list], path: Path, ids_type: pa.DataType, stream_state: dict | None = None):
    arrays = {
        name: pa.array(values, type=pa.list_(ids_type) if name.startswith("token_ids") else None)
        for name, values in columns.items()
    }
    table = pa.table(arrays)
    if stream_state is not None:
        table = table.replace_schema_metadata({STREAM_STATE_KEY: json.dumps(stream_state)})
    temporary = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)
