"""The `flextok-hf` command line and its aliases, end to end on tiny models and images."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from reference_format import write_hub_format
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import random_ar_model, random_flextok_model, random_images

from flextok_hf import FlexTokModel, FlexTokPipeline
from flextok_hf.cli import COMMANDS, EXIT_INPUT_ERROR, EXIT_USAGE_ERROR, build_parser, convert_main, main
from flextok_hf.evaluation.rate_distortion import evaluate_token_budgets

FAST = ["--steps", 1, "--guidance-scale", 1]  # one decoder step, no guidance
NAMES = ["cat", "dog", "owl"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_images(folder, size: int, seed: int = 0) -> torch.Tensor:
    """Random RGB PNGs `<name>.png`, the last one in a subfolder; returns their pixels `[N, 3, size, size]` in
    [-1, 1], as the command reads them with `--resize none`."""
    pixels = ((random_images(len(NAMES), size, seed) + 1) * 127.5).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    (folder / "more").mkdir(parents=True)
    for name, image in zip(NAMES, pixels, strict=True):
        PIL.Image.fromarray(image).save(folder / ("more" if name == NAMES[-1] else "") / f"{name}.png")
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def model():
    return random_flextok_model()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of three 16x16 images (the tiny model's size), and their pixels."""
    folder = tmp_path_factory.mktemp("images")
    return folder, save_images(folder, 16)


def run(argv: list, capsys) -> tuple[int, str, str]:
    """Runs the command in this process: (exit status, stdout, stderr)."""
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    output = capsys.readouterr()
    return code, output.out, output.err


def read_tokens(path) -> tuple[list[str], list[list[int]]]:
    """The image names and token ids of a token file, checking its layout."""
    if str(path).endswith(".parquet"):
        table = pq.read_table(path)
        assert table.column_names == ["path", "token_ids", "length"]
        assert table["length"].to_pylist() == [len(ids) for ids in table["token_ids"].to_pylist()]
        return table["path"].to_pylist(), table["token_ids"].to_pylist()
    with safe_open(path, framework="pt") as file:
        padded, lengths = file.get_tensor("token_ids"), file.get_tensor("lengths").tolist()
        names = json.loads(file.metadata()["paths"])
    assert padded.dtype == torch.long and padded.shape == (len(lengths), max(lengths))
    assert all((row[k:] == -1).all() for row, k in zip(padded, lengths, strict=True))  # the padding
    return names, [row[:k].tolist() for row, k in zip(padded, lengths, strict=True)]


# ------------------------------------------------------------------------------------------------ commands


def test_subcommands_are_listed_with_their_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert set(COMMANDS) == {"tokenize", "detokenize", "evaluate", "generate", "convert", "reconstruct", "train"}
    assert all(name in help_text for name in COMMANDS)


def test_parser_routes_each_subcommand_to_its_function():
    args = build_parser().parse_args(["convert", "src", "out", "--push-to-hub", "me/flextok"])
    assert args.run is COMMANDS["convert"][0] and args.push_to_hub == "me/flextok"


def test_convert_subcommand_and_its_alias(tmp_path, capsys):
    original = random_flextok_model(seed=4)
    write_hub_format(original, tmp_path / "reference")
    main(["convert", str(tmp_path / "reference"), str(tmp_path / "converted")])
    convert_main([str(tmp_path / "reference"), str(tmp_path / "alias")])
    assert "Wrote" in capsys.readouterr().out
    images = random_images(2)
    for folder in ("converted", "alias"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["model_type"] == "flextok"
        assert torch.equal(FlexTokModel.from_pretrained(tmp_path / folder).encode(images), original.encode(images))


@pytest.mark.parametrize("suffix", [".safetensors", ".parquet"])
def test_tokenize_then_detokenize(model, model_dir, images, tmp_path, capsys, suffix):
    folder, pixels = images
    tokens = tmp_path / f"tokens{suffix}"
    common = ["--model", model_dir, "--batch-size", 2, "--device", "cpu"]
    code, out, _ = run(["tokenize", folder, "--output", tokens, "--resize", "none", "--num-tokens", 5, *common], capsys)
    assert code == 0 and "3 images, 5.0 tokens per image" in out

    # The folder's images, found recursively, in sorted order, each with its first 5 token ids.
    names, token_ids = read_tokens(tokens)
    assert names == [str(folder / "cat.png"), str(folder / "dog.png"), str(folder / "more" / "owl.png")]
    full_ids = model.encode(pixels)
    assert token_ids == full_ids[:, :5].tolist()

    # Each image decoded from its first 3 tokens, the noise drawn image after image from --seed, in batches of 2.
    out_dir = tmp_path / "decoded"
    code, out, _ = run(
        ["detokenize", tokens, "--output-dir", out_dir, "--num-tokens", 3, "--seed", 7, *FAST, *common], capsys
    )
    assert code == 0 and "Wrote 3 images" in out
    expected = model.decode(
        full_ids[:, :3], num_inference_steps=1, guidance_scale=1, generator=seeded(7), output_type="pil"
    )
    for name, image in zip(NAMES, expected.images, strict=True):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out_dir / f"{name}.png")), np.asarray(image))


def test_tokenize_with_posterior_samples_is_seeded_per_image(images, tmp_path, capsys):
    folder, pixels = images
    sampling = random_flextok_model(vae_sample_posterior=True)
    sampling.save_pretrained(tmp_path / "model")
    token_ids = {}
    for batch_size in (1, 3):
        tokens = tmp_path / f"tokens_{batch_size}.safetensors"
        argv = ["tokenize", folder, "--output", tokens, "--resize", "none", "--model", tmp_path / "model", "--seed", 5]
        assert run([*argv, "--batch-size", batch_size], capsys)[0] == 0
        token_ids[batch_size] = read_tokens(tokens)[1]
    # One generator from --seed, drawn image after image whatever the batches (compared per batch size: the VAE's
    # rounding differs between batch sizes).
    assert token_ids[3] == sampling.encode(pixels, generator=seeded(5)).tolist()
    generator = seeded(5)
    assert token_ids[1] == [sampling.encode(image[None], generator=generator)[0].tolist() for image in pixels]
    assert token_ids[3] != sampling.encode(pixels, generator=seeded(6)).tolist()  # the samples do depend on the seed


def test_adaptive_tokenize_meets_its_target(model, model_dir, images, tmp_path, capsys):
    folder, pixels = images
    tokens = tmp_path / "adaptive.parquet"
    argv = ["tokenize", folder, "--output", tokens, "--resize", "none", "--model", model_dir, "--seed", 4, *FAST]
    # The random model's latent MSEs are about 280 to 380: a target in that range is met by some images only. How many
    # depends on the platform's numbers, so the command is compared with the API on the same noise.
    target = 330.0
    code, out, _ = run([*argv, "--target", target], capsys)
    expected = model.encode(pixels, target=target, generator=seeded(4), num_inference_steps=1, guidance_scale=1.0)
    assert code == 0 and f"{int(expected.met_target.sum())} of 3 images met the target latent_mse 330" in out
    assert (expected.scores[expected.met_target] <= target).all()
    _, token_ids = read_tokens(tokens)
    assert token_ids == [ids.tolist() for ids in expected.token_ids]

    # --num-tokens caps the search: with a target no image meets, every image gets the cap.
    code, out, _ = run([*argv, "--target", 0, "--num-tokens", 2], capsys)
    assert code == 0 and "0 of 3 images met the target latent_mse 0" in out
    assert [len(ids) for ids in read_tokens(tokens)[1]] == [2, 2, 2]
    # A PSNR target is met from above: every image reaches 5 dB with one token.
    code, out, _ = run([*argv, "--target", 5, "--metric", "psnr"], capsys)
    assert code == 0 and "3 of 3 images met the target psnr 5" in out
    assert [len(ids) for ids in read_tokens(tokens)[1]] == [1, 1, 1]


def test_tokenize_a_streamed_dataset(model, model_dir, images, tmp_path, capsys):
    folder, pixels = images
    files = sorted(folder.rglob("*.png"))
    shard = tmp_path / "shard-0.parquet"
    pq.write_table(pa.table({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files]}), shard)
    tokens = tmp_path / "tokens.safetensors"
    argv = ["tokenize", "--dataset", tmp_path / "shard-*.parquet", "--max-images", 2, "--output", tokens]
    code, out, _ = run([*argv, "--model", model_dir, "--dtype", "bfloat16"], capsys)
    assert code == 0 and "2 images" in out
    names, token_ids = read_tokens(tokens)
    assert names == ["cat.png", "dog.png"]
    assert all(len(ids) == 8 and 0 <= min(ids) and max(ids) < model.config.codebook_size for ids in token_ids)
    # In float32, exactly the ids of the images themselves (already the model's size, so not resized).
    assert run([*argv, "--model", model_dir], capsys)[0] == 0
    assert read_tokens(tokens)[1] == model.encode(pixels[:2]).tolist()


def test_evaluate_writes_the_rate_distortion_report(model, model_dir, images, tmp_path, capsys):
    folder, pixels = images
    out_dir = tmp_path / "results"
    argv = ["evaluate", folder, "--resize", "none", "--output-dir", out_dir, "--model", model_dir, "--budgets", 1, 8]
    code, out, _ = run([*argv, "--grid", 2, *FAST], capsys)
    assert code == 0 and "| euler | 1 | 1 | 8 |" in out
    rows = json.loads((out_dir / "results.json").read_text())
    expected, _ = evaluate_token_budgets(model, [pixels], budgets=[1, 8], num_inference_steps=1, guidance_scale=1.0)
    assert rows == [pytest.approx(row) for row in expected]
    for name in ("results.md", "results.csv", "rate_distortion.png"):
        assert (out_dir / name).stat().st_size > 0
    assert PIL.Image.open(out_dir / "reconstructions.png").size == (3 * 16, 2 * 16)  # original + 2 budgets, 2 rows


@pytest.fixture(scope="module")
def pipeline_dir(model, tmp_path_factory):
    """A saved class-conditional pipeline: a tiny generator of 8 tokens over the tiny tokenizer's vocabulary."""
    ar_model = random_ar_model(1, vocab_size=model.config.codebook_size, max_position_embeddings=8, num_classes=10)
    directory = tmp_path_factory.mktemp("pipeline")
    FlexTokPipeline(ar_model=ar_model, flextok=model, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(
        directory
    )
    return directory


def test_generate_class_labels(pipeline_dir, tmp_path, capsys):
    out_dir = tmp_path / "samples"
    argv = ["generate", "--pipeline", pipeline_dir, "--class-labels", 3, 5, "--num-images-per-prompt", 2]
    code, out, _ = run([*argv, "--num-tokens", 4, "--steps", 1, "--seed", 1, "--output-dir", out_dir], capsys)
    assert code == 0 and "Wrote 4 images" in out
    pipe = FlexTokPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        class_labels=[3, 5], num_images_per_prompt=2, num_tokens=4, num_inference_steps=1, generator=seeded(1)
    )
    for i, image in enumerate(expected.images):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out_dir / f"{i:05d}.png")), np.asarray(image))


def test_train_points_to_the_training_scripts(capsys):
    code, out, _ = run(["train"], capsys)
    assert code == 0
    assert "accelerate launch training/train_tokenizer.py --config" in out and "docs/training.md" in out


# -------------------------------------------------------------------------------------------------- errors


def bad_token_files(folder, codebook_size: int) -> dict:
    """A valid token file and those that `detokenize` must refuse, by what is wrong with them."""
    folder.mkdir()
    files = {name: folder / f"{name}.safetensors" for name in ("valid", "garbage", "no_lengths", "out_of_range")}
    save_file({"token_ids": torch.ones(1, 8, dtype=torch.long), "lengths": torch.tensor([8])}, files["valid"])
    files["garbage"].write_bytes(b"not a safetensors file")
    save_file({"token_ids": torch.zeros(2, 4, dtype=torch.long)}, files["no_lengths"])
    save_file({"token_ids": torch.tensor([[1, codebook_size]]), "lengths": torch.tensor([2])}, files["out_of_range"])
    files["float_ids"] = folder / "float_ids.parquet"
    pq.write_table(pa.table({"token_ids": [[0.5, 1.0]]}), files["float_ids"])
    return files


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing_image", EXIT_INPUT_ERROR, "No such file or folder: "),
        ("empty_folder", EXIT_INPUT_ERROR, "holds no image files"),
        ("unreadable_image", EXIT_INPUT_ERROR, "as an image: cannot identify image file"),
        ("wrong_image_size", EXIT_INPUT_ERROR, "must be positive multiples of 4 (VAE factor 2 x patch size 2)"),
        ("mixed_image_sizes", EXIT_INPUT_ERROR, "with --resize none all images must have one size"),
        ("missing_model", EXIT_INPUT_ERROR, "No such model folder: "),
        (
            "not_a_flextok_model",
            EXIT_INPUT_ERROR,
            "is not a FlexTok tokenizer: its config.json has model_type 'flextok_ar'",
        ),
        ("missing_checkpoint", EXIT_INPUT_ERROR, "No such checkpoint: "),
        (
            "not_a_checkpoint",
            EXIT_INPUT_ERROR,
            "broken.png is not a checkpoint: expected a folder, a .safetensors file",
        ),
        ("unknown_device", EXIT_USAGE_ERROR, "--device must be a torch device such as cpu, cuda or cuda:1, got gpu"),
        ("unavailable_device", EXIT_USAGE_ERROR, "--device cuda:99 is not available here: "),
        ("missing_reconstruct_image", EXIT_INPUT_ERROR, "No such image file: "),
        ("bad_reconstruct_output", EXIT_USAGE_ERROR, "--output must end in an image type PIL writes"),
        ("missing_features", EXIT_INPUT_ERROR, "No such --features file or folder: missing.pt"),
        ("missing_perceptual_model", EXIT_INPUT_ERROR, "No such --perceptual-model folder: "),
        ("no_image_column", EXIT_INPUT_ERROR, "Found no image column in ['token_ids']; name it with image_column"),
        ("refused_decode_value", EXIT_USAGE_ERROR, "guidance_scale must be a finite number >= 0"),
        ("missing_pipeline", EXIT_INPUT_ERROR, "No such pipeline folder: "),
        ("no_images", EXIT_USAGE_ERROR, "Give image files or folders, or --dataset"),
        ("bad_output_suffix", EXIT_USAGE_ERROR, "--output must end in .safetensors or .parquet"),
        ("missing_token_file", EXIT_INPUT_ERROR, "No such token file: "),
        ("garbage", EXIT_INPUT_ERROR, "as a token file"),
        ("no_lengths", EXIT_INPUT_ERROR, "needs tensors 'token_ids' and 'lengths', has ['token_ids']"),
        ("out_of_range", EXIT_INPUT_ERROR, "has token ids in [1, 1000]; the model's vocabulary is [0, 1000)"),
        ("float_ids", EXIT_INPUT_ERROR, "needs a 'token_ids' column of integer lists"),
        ("too_many_tokens", EXIT_USAGE_ERROR, "num_tokens must be an int in [1, 8], got 9"),
        ("unknown_dtype", EXIT_USAGE_ERROR, "argument --dtype: invalid choice: 'float64'"),
        ("prompt_for_class_pipeline", EXIT_USAGE_ERROR, "ar_model is class-conditional (10 classes)"),
        ("unknown_sampler", EXIT_USAGE_ERROR, "--samplers must be among"),
    ],
)
def test_user_errors_exit_with_one_line_and_no_traceback(
    case, code, message, model, model_dir, images, pipeline_dir, tmp_path, capsys
):
    folder, _ = images
    token_files = bad_token_files(tmp_path / "tokens", model.config.codebook_size)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_text("not an image")
    save_images(tmp_path / "large", 24)
    mixed = tmp_path / "mixed"
    save_images(mixed, 16)
    PIL.Image.new("RGB", (8, 8)).save(mixed / "zebra.png")
    tokenize = ["tokenize", "--output", tmp_path / "out.parquet", "--model", model_dir]
    detokenize = ["--output-dir", tmp_path / "decoded", "--model", model_dir]
    evaluate = ["evaluate", folder, "--output-dir", tmp_path / "decoded", "--model", tmp_path / "nothing"]
    ar_model_dir = pipeline_dir / "ar_model"
    argv = {
        "missing_image": [*tokenize, folder / "missing.png"],
        "empty_folder": [*tokenize, tmp_path / "empty"],
        "unreadable_image": [*tokenize, folder, tmp_path / "broken.png"],
        "wrong_image_size": [*tokenize, tmp_path / "large", "--resize", "none"],
        "mixed_image_sizes": [*tokenize, mixed, "--resize", "none"],
        "missing_model": ["tokenize", folder, "--output", tmp_path / "out.parquet", "--model", tmp_path / "nothing"],
        "not_a_flextok_model": ["tokenize", folder, "--output", tmp_path / "out.parquet", "--model", ar_model_dir],
        "missing_checkpoint": ["convert", tmp_path / "nothing", tmp_path / "decoded"],
        "not_a_checkpoint": ["convert", tmp_path / "broken.png", tmp_path / "decoded"],
        "unknown_device": [*tokenize, folder, "--device", "gpu"],
        "unavailable_device": [*tokenize, folder, "--device", "cuda:99"],
        # Checked before the model loads: the missing model would be reported otherwise.
        "missing_reconstruct_image": [
            "reconstruct",
            "--image",
            tmp_path / "missing.jpg",
            "--model",
            tmp_path / "nothing",
        ],
        "bad_reconstruct_output": ["reconstruct", "--output", tmp_path / "t1.xyz", "--model", tmp_path / "nothing"],
        "missing_features": [*evaluate, "--features", "missing.pt"],
        "missing_perceptual_model": [*evaluate, "--perceptual-model", tmp_path / "nothing"],
        "no_image_column": [*tokenize, "--dataset", token_files["float_ids"]],
        "refused_decode_value": ["detokenize", token_files["valid"], *detokenize, "--guidance-scale", -1],
        "missing_pipeline": ["generate", "--pipeline", tmp_path / "nothing", "--class-labels", 1, *detokenize[:2]],
        "no_images": tokenize,
        "bad_output_suffix": ["tokenize", folder, "--output", tmp_path / "tokens.npy", "--model", model_dir],
        "missing_token_file": ["detokenize", tmp_path / "missing.safetensors", *detokenize],
        "too_many_tokens": ["detokenize", token_files["valid"], *detokenize, "--num-tokens", 9],
        "unknown_dtype": ["detokenize", token_files["out_of_range"], *detokenize, "--dtype", "float64"],
        "prompt_for_class_pipeline": ["generate", "--pipeline", pipeline_dir, "--prompt", "a cat", *detokenize[:2]],
        "unknown_sampler": [*evaluate, "--samplers", "rk4"],
    }.get(case) or ["detokenize", token_files[case], *detokenize]

    status, out, err = run(argv, capsys)
    assert status == code
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"flextok-hf {argv[0]}: error: ")
    if code == EXIT_INPUT_ERROR:
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "decoded").exists()


HIDDEN = ("skimage", "matplotlib")


def test_a_missing_optional_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    # As if not installed; sys.modules is left alone, so no library re-imports half of itself.
    installed = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in HIDDEN else installed(name, *a))
    code, _, err = run(["reconstruct", "--output", tmp_path / "grid.png"], capsys)
    assert code == EXIT_INPUT_ERROR
    assert err == (
        "flextok-hf reconstruct: error: The default photo (no --image) needs scikit-image, which is not installed: "
        "pip install scikit-image\n"
    )
    # Before any image is read or model loaded, not once the results are computed.
    code, _, err = run(["evaluate", tmp_path / "nothing", "--output-dir", tmp_path, "--model", "random"], capsys)
    assert code == EXIT_INPUT_ERROR
    assert err.endswith("needs matplotlib, which is not installed: pip install matplotlib\n")


def test_reconstruct_bad_num_tokens_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(["reconstruct", "--output", tmp_path / "grid.png", "--num-tokens", 0, "--steps", 1], capsys)
    assert code == EXIT_USAGE_ERROR
    assert "reconstruct: error: num_tokens must be an int in [1, 256], got 0" in err
    assert not (tmp_path / "grid.png").exists()


def test_as_a_process_errors_are_one_line_and_parsing_needs_no_torch(tmp_path):
    command = [sys.executable, "-m", "flextok_hf.cli", "detokenize", tmp_path / "missing.parquet"]
    command += ["--output-dir", tmp_path, "--model", "random"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == EXIT_INPUT_ERROR
    assert result.stderr.splitlines() == [
        f"flextok-hf detokenize: error: No such token file: {tmp_path}/missing.parquet"
    ]

    # Parsing (and so --help) imports no torch: each command imports what it needs when it runs.
    probe = "import sys; from flextok_hf.cli import main; main(['train']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "False"
