"""The `flextok-hf` command line, one subcommand per task (docs/cli.md has them all, with examples):

    flextok-hf tokenize photos/ --model EPFL-VILAB/flextok_d18_d28_dfn --output tokens.safetensors
    flextok-hf tokenize photos/ --model ... --target 25 --metric psnr --output tokens.parquet   # fewest tokens each
    flextok-hf detokenize tokens.safetensors --model ... --output-dir reconstructions --num-tokens 64
    flextok-hf evaluate val_photos/ --model ... --output-dir results --budgets 1 16 256
    flextok-hf generate --pipeline path/to/saved_pipeline --class-labels 207 360 --output-dir samples
    flextok-hf convert EPFL-VILAB/flextok_d18_d28_dfn ./flextok_d18_d28_dfn     # released format -> ours
    flextok-hf reconstruct --model random --output grid.png                      # offline, fresh random model
    flextok-hf train                                                              # how to launch training

Exit status: 0 on success, 1 for input data the command cannot use (missing or unreadable files, wrong image sizes,
bad token files, token ids outside the vocabulary, a missing optional package), 2 for usage errors (arguments
argparse refuses, or values out of range); either prints one line on stderr, no traceback.

`flextok-convert` and `flextok-reconstruct` are aliases of the two subcommands. A subcommand is one function
`name(args)` decorated with `@command(argument(...), ...)`: its name, help (the docstring's first line) and
arguments come from there. Each imports what it needs when it runs, so `--help` answers without loading torch.
"""

import argparse
import inspect
import json
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

COMMANDS = {}
EXIT_INPUT_ERROR = 1
EXIT_USAGE_ERROR = 2  # as argparse's own errors
PADDING_ID = -1  # past each sequence's length in a .safetensors token file: never a valid id
LOCAL_SUFFIXES = (".pt", ".safetensors")  # files that loaders never take for a Hub repo id


class InputError(Exception):
    """Input data the command cannot use: missing or unreadable files, wrong image sizes, bad token files."""


def argument(*names, **options) -> tuple:
    """One `ArgumentParser.add_argument(*names, **options)` call, for `command`."""
    return names, options


def command(*arguments):
    """Registers the decorated `function(args)` as the subcommand named after it, taking `arguments`."""

    def register(function):
        COMMANDS[function.__name__.replace("_", "-")] = (function, arguments)
        return function

    return register


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# Arguments that several subcommands take.
MODEL_HELP = "a folder or Hub repo id (either checkpoint format), or 'random': a small fresh model built from --seed"
MODEL = argument("--model", required=True, help=MODEL_HELP)
DEVICE = argument("--device", help="default: cuda if available, else cpu")
DTYPE = argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="of the weights")
BATCH_SIZE = argument("--batch-size", type=positive_int, default=8, help="images per batch (default 8)")
SEED = argument("--seed", type=int, default=0, help="seeds the noise (and the 'random' model)")
STEPS = argument("--steps", type=positive_int, default=25, help="decoder Euler steps")
GUIDANCE_SCALE = argument("--guidance-scale", type=float, default=7.5, help="decoder guidance; 1 disables it")
IMAGE_INPUTS = (
    argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files and folders (searched recursively)"),
    argument("--dataset", help="instead: a Hub dataset, or a glob of .tar shards or .parquet files, streamed"),
    argument("--split", default="train", help="the dataset's split"),
    argument("--image-column", help="the dataset's image column (default: the first of image, jpg, jpeg, png, ...)"),
    argument("--max-images", type=positive_int, help="read at most this many images"),
    argument(
        "--resize",
        choices=["crop", "none"],
        default="crop",
        help="crop: shorter side to the model's image size, then a center crop (default); none: use the images as "
        "they are (all of one size the model takes)",
    ),
)


# ----------------------------------------------------------------------------------------------- helpers


def torch_device_and_dtype(args):
    """`--device`, checked to be one that torch can use here (else a usage error), and `--dtype`."""
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {name}.") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # a torch built without CUDA asserts
        raise ValueError(f"--device {name} is not available here: {one_line(error)}") from None
    return device, getattr(torch, args.dtype)


def check_local_path(name: str, what: str):
    """Refuses a local path that does not exist, before loading code takes it for a Hub repo id ('name' or
    'owner/name') and reports a network or id error. Local: absolute, starting with '.', with more than one '/', or
    a .pt or .safetensors file."""
    path = Path(name)
    is_local = path.is_absolute() or name.startswith(".") or name.count("/") > 1 or path.suffix in LOCAL_SUFFIXES
    if is_local and not path.exists():
        raise InputError(f"No such {what}: {name}")


def check_flextok_checkpoint(name: str, what: str):
    """Refuses a local path that holds no FlexTok checkpoint (of either format), which loading would report as a
    Hub-id error or a traceback."""
    from .loading_reference import is_reference_config

    check_local_path(name, what)
    path = Path(name)
    if path.is_file() and path.suffix != ".safetensors":
        raise InputError(f"{name} is not a checkpoint: expected a folder, a .safetensors file or a Hub repo id.")
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "flextok" and not is_reference_config(config):
            raise InputError(
                f"{name} is not a FlexTok tokenizer: its config.json has model_type {config.get('model_type')!r}, "
                "expected 'flextok'."
            )


def load_tokenizer(args):
    """The `FlexTokModel` named by `--model`, on `--device` in `--dtype`, in eval mode."""
    from .modeling_flextok import FlexTokModel
    from .reconstruction_grid import small_random_model

    device, dtype = torch_device_and_dtype(args)
    hide_progress_bars_off_terminal()
    if args.model == "random":
        model = small_random_model(args.seed)
    else:
        check_flextok_checkpoint(args.model, "model folder")
        model = FlexTokModel.from_pretrained(args.model)
    return model.to(device=device, dtype=dtype).eval()


def require_package(module: str, package: str, purpose: str):
    """Fails up front, naming the pip command, when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{purpose} needs {package}, which is not installed: pip install {package}")


def quiet_decoding():
    """Hides the progress bar of every `decode` call: the commands show one bar over all images instead."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def hide_progress_bars_off_terminal():
    """Hides the libraries' bars (loading weights and pipelines, downloads, decoding steps) unless stderr is a
    terminal, as `progress_bar` does: logs and pipes stay clean."""
    if not sys.stderr.isatty():
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # and huggingface_hub's
        diffusers_logging.disable_progress_bar()


def progress_bar(total: int | None, description: str):
    """A bar counting images, shown on an interactive stderr only, so that logs and pipes stay clean."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="image", desc=description, disable=None)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def image_files(inputs: list[str]) -> list[Path]:
    """The named image files and the images in the named folders (recursively, sorted), in order."""
    import PIL.Image

    extensions = set(PIL.Image.registered_extensions())
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise InputError(f"{name} holds no image files.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"No such file or folder: {name}")
    return files


def read_pixels(path: Path, model, resize: str):
    """An image file -> float32 `[3, H, W]` in [-1, 1]: cropped to the model's image size, or as it is."""
    import numpy as np

    from .training.data import open_image, preprocess_image

    try:
        image = open_image({"path": str(path)})
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... on malformed files
        raise InputError(f"Cannot read {path} as an image: {one_line(error)}") from None
    if resize == "crop":
        return preprocess_image(image, model.config.image_size, random_crop=False, random_flip=False, rng=None)
    try:
        model.check_image_size(image.height, image.width)
    except ValueError as error:
        raise InputError(f"{path}: {error} Use --resize crop to resize and crop it.") from None
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1).transpose(2, 0, 1)


def image_files_to_read(args) -> list[Path] | None:
    """Checks the image arguments before a model loads: the image files to read (at most `--max-images`), or None
    for `--dataset`."""
    if bool(args.inputs) == bool(args.dataset):
        raise ValueError("Give image files or folders, or --dataset, but not both.")
    if args.dataset is None:
        return image_files(args.inputs)[: args.max_images]
    if args.resize != "crop":
        raise ValueError("--dataset images are always cropped to the model's image size (--resize crop).")
    return None


def image_batches(args, files: list[Path] | None, model) -> Iterator[tuple[list[str], object]]:
    """`(names, images [B, 3, H, W] in [-1, 1])` batches of `--batch-size` from `files`, or from `--dataset` when
    `files` is None (see `image_files_to_read`)."""
    import itertools

    import numpy as np
    import torch

    if files is None:
        from .training.data import build_image_stream, collated_batches

        try:
            stream = build_image_stream(
                args.dataset, args.split, resolution=model.config.image_size, image_column=args.image_column
            )
        except ValueError as error:  # no files match, no image column...: the data, not the arguments
            raise InputError(error) from None
        for batch in collated_batches(itertools.islice(stream, args.max_images), args.batch_size):
            yield batch["keys"], batch["pixel_values"]
        return
    first_size = None
    for start in range(0, len(files), args.batch_size):
        paths = files[start : start + args.batch_size]
        pixels = [read_pixels(path, model, args.resize) for path in paths]
        for path, image in zip(paths, pixels, strict=True):
            first_size = first_size or image.shape[1:]
            if image.shape[1:] != first_size:
                raise InputError(
                    f"{path} is {image.shape[1]}x{image.shape[2]} but {files[0]} is {first_size[0]}x{first_size[1]}: "
                    "with --resize none all images must have one size."
                )
        yield [str(path) for path in paths], torch.from_numpy(np.stack(pixels))


def write_token_file(path: Path, names: list[str], sequences: list, metadata: dict[str, str]):
    """`.safetensors`: `token_ids` int64 `[N, longest]` padded with -1 and `lengths` `[N]`, the image names and
    `metadata` in its header; `.parquet`: one row per image (`path`, `token_ids`, `length`), `metadata` in the
    schema."""
    import torch

    lengths = [len(ids) for ids in sequences]
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        padded = torch.full((len(sequences), max(lengths)), PADDING_ID, dtype=torch.long)
        for row, ids in zip(padded, sequences, strict=True):
            row[: len(ids)] = ids
        header = {"paths": json.dumps(names), **metadata}
        save_file({"token_ids": padded, "lengths": torch.tensor(lengths)}, path, metadata=header)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "path": pa.array(names, pa.string()),
                "token_ids": pa.array([ids.tolist() for ids in sequences], pa.list_(pa.int64())),
                "length": pa.array(lengths, pa.int64()),
            }
        )
        pq.write_table(table.replace_schema_metadata(metadata), path)


def read_token_file(path: str) -> tuple[list[str], list, dict]:
    """The names, token sequences (1D LongTensors) and metadata of a token file that `tokenize` wrote, or of any
    file of that layout. Raises `InputError` saying what is wrong with it."""
    import torch

    file = Path(path)
    if not file.is_file():
        raise InputError(f"No such token file: {path}")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as tensors:
                metadata = tensors.metadata() or {}
                if not {"token_ids", "lengths"} <= set(tensors.keys()):
                    raise InputError(f"{path} needs tensors 'token_ids' and 'lengths', has {sorted(tensors.keys())}.")
                padded, lengths = tensors.get_tensor("token_ids"), tensors.get_tensor("lengths")
            if padded.ndim != 2 or lengths.shape != (len(padded),) or padded.is_floating_point():
                raise InputError(
                    f"{path}: expected integer token_ids [N, length] and lengths [N], got token_ids "
                    f"{tuple(padded.shape)} ({padded.dtype}) and lengths {tuple(lengths.shape)}."
                )
            if len(padded) and (lengths.min() < 1 or lengths.max() > padded.shape[1]):
                raise InputError(f"{path}: lengths must be in [1, {padded.shape[1]}], got {lengths.tolist()}.")
            sequences = [ids[:k].long() for ids, k in zip(padded, lengths.tolist(), strict=True)]
            names = json.loads(metadata.pop("paths", "[]")) or [str(i) for i in range(len(sequences))]
        elif file.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.read_table(file)
            columns = table.column_names
            token_type = table.schema.field("token_ids").type if "token_ids" in columns else pa.null()
            is_list = pa.types.is_list(token_type) or pa.types.is_large_list(token_type)
            if not is_list or not pa.types.is_integer(token_type.value_type):
                types = dict(zip(columns, map(str, table.schema.types), strict=True))
                raise InputError(f"{path} needs a 'token_ids' column of integer lists, has {types}.")
            sequences = [torch.tensor(ids or [], dtype=torch.long) for ids in table["token_ids"].to_pylist()]
            if "length" in columns and table["length"].to_pylist() != [len(ids) for ids in sequences]:
                raise InputError(f"{path}: its 'length' column differs from the lengths of its token_ids.")
            # `tokenize` writes image paths, training/pretokenize.py example keys.
            name_column = next((name for name in ("path", "key") if name in columns), None)
            names = table[name_column].to_pylist() if name_column else [str(i) for i in range(len(sequences))]
            metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
        else:
            raise InputError(f"{path}: a token file is .safetensors or .parquet.")
    except InputError:
        raise
    except Exception as error:  # safetensors and pyarrow raise their own errors on damaged files
        raise InputError(f"Cannot read {path} as a token file: {one_line(error)}") from None
    if not sequences:
        raise InputError(f"{path} holds no token sequences.")
    if len(names) != len(sequences):
        raise InputError(f"{path} names {len(names)} images for {len(sequences)} token sequences.")
    return names, sequences, metadata


def check_token_sequences(sequences: list, names: list[str], config, path: str):
    """Every sequence holds 1 to `num_registers` ids in [0, `codebook_size`)."""
    for name, ids in zip(names, sequences, strict=True):
        if not 1 <= len(ids) <= config.num_registers:
            raise InputError(f"{path}: {name} has {len(ids)} tokens; the model takes 1 to {config.num_registers}.")
        if ids.min() < 0 or ids.max() >= config.codebook_size:
            raise InputError(
                f"{path}: {name} has token ids in [{ids.min().item()}, {ids.max().item()}]; the model's vocabulary "
                f"is [0, {config.codebook_size})."
            )


def png_names(names: list[str]) -> list[str]:
    """`<stem>.png` per image name, numbered `<index>_<stem>.png` where two names share a stem."""
    stems = [Path(name).stem or f"{i:05d}" for i, name in enumerate(names)]
    if len(set(stems)) < len(stems):
        stems = [f"{i:05d}_{stem}" for i, stem in enumerate(stems)]
    return [f"{stem}.png" for stem in stems]


# ---------------------------------------------------------------------------------------------- commands


@command(
    *IMAGE_INPUTS,
    argument("--output", required=True, help="token file to write: .safetensors or .parquet"),
    MODEL,
    argument("--num-tokens", type=positive_int, help="keep the first N tokens (with --target: at most N)"),
    argument("--target", type=float, help="adaptive: per image, the fewest tokens whose reconstruction meets this"),
    argument("--metric", choices=["latent_mse", "psnr"], default="latent_mse", help="the unit of --target"),
    STEPS,
    GUIDANCE_SCALE,
    SEED,
    BATCH_SIZE,
    DEVICE,
    DTYPE,
)
def tokenize(args):
    """Tokenize images into a token file, all tokens or a fixed or adaptive number per image.

    With --target each image gets the fewest tokens whose reconstruction meets it (--metric latent_mse: at most
    the target; psnr: at least the target, in dB), found by decoding candidate prefixes with --steps and
    --guidance-scale. The .safetensors file holds `token_ids` [N, longest] padded with -1 and `lengths` [N]; the
    .parquet file one row per image: path, token_ids, length.
    """
    import torch

    from .evaluation.rate_distortion import power_of_two_budgets
    from .utils import check_num_tokens

    output = Path(args.output)
    if output.suffix not in (".safetensors", ".parquet"):
        raise ValueError(f"--output must end in .safetensors or .parquet, got {args.output}.")
    files = image_files_to_read(args)
    model = load_tokenizer(args)
    num_registers = model.config.num_registers
    num_tokens = num_registers if args.num_tokens is None else check_num_tokens(args.num_tokens, num_registers)
    quiet_decoding()
    generator = torch.Generator().manual_seed(args.seed)
    names, sequences, num_met = [], [], 0
    total = args.max_images if files is None else len(files)
    with progress_bar(total, "Tokenizing") as bar:
        for batch_names, images in image_batches(args, files, model):
            if args.target is None:
                sequences += list(model.encode(images, generator=generator)[:, :num_tokens].cpu())
            else:
                adaptive = model.encode(
                    images,
                    target=args.target,
                    metric=args.metric,
                    candidates=power_of_two_budgets(num_tokens),
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    generator=generator,
                )
                sequences += [ids.cpu() for ids in adaptive.token_ids]
                num_met += adaptive.met_target.sum().item()
            names += batch_names
            bar.update(len(batch_names))
    if not sequences:
        raise InputError(f"{args.dataset} holds no readable images.")
    height, width = images.shape[2:]  # of every image: cropped to one size, or checked to share one
    output.parent.mkdir(parents=True, exist_ok=True)
    write_token_file(output, names, sequences, {"model": args.model, "height": str(height), "width": str(width)})
    mean_length = sum(len(ids) for ids in sequences) / len(sequences)
    print(f"Wrote {output}: {len(sequences)} images, {mean_length:.1f} tokens per image on average")
    if args.target is not None:
        print(f"{num_met} of {len(sequences)} images met the target {args.metric} {args.target:g}")


@command(
    argument("tokens", help="token file from `tokenize` (.safetensors or .parquet)"),
    argument("--output-dir", required=True, help="folder for the PNGs, one per image, named after its source"),
    MODEL,
    argument("--num-tokens", type=positive_int, help="decode only the first N tokens of each image"),
    STEPS,
    GUIDANCE_SCALE,
    SEED,
    BATCH_SIZE,
    DEVICE,
    DTYPE,
)
def detokenize(args):
    """Decode a token file into images, one PNG each (--num-tokens truncates every sequence)."""
    import torch

    from .utils import check_num_tokens

    names, sequences, metadata = read_token_file(args.tokens)
    model = load_tokenizer(args)
    check_token_sequences(sequences, names, model.config, args.tokens)
    if args.num_tokens is not None:
        num_tokens = check_num_tokens(args.num_tokens, model.config.num_registers)
        sequences = [ids[:num_tokens] for ids in sequences]
    if metadata.get("model", args.model) != args.model:
        print(f"Note: {args.tokens} was tokenized with --model {metadata['model']}, not {args.model}.", file=sys.stderr)
    try:
        height = int(metadata.get("height", model.config.image_size))
        width = int(metadata.get("width", model.config.image_size))
        model.check_image_size(height, width)
    except ValueError as error:
        raise InputError(f"{args.tokens}: bad image size in its metadata: {error}") from None
    output_dir = Path(args.output_dir)
    quiet_decoding()
    generator = torch.Generator().manual_seed(args.seed)  # drawn image after image: the batch size changes nothing
    files = [output_dir / name for name in png_names(names)]
    with progress_bar(len(files), "Decoding") as bar:
        for start in range(0, len(files), args.batch_size):
            images = model.decode(
                sequences[start : start + args.batch_size],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                generator=generator,
                height=height,
                width=width,
                output_type="pil",
            ).images
            output_dir.mkdir(parents=True, exist_ok=True)  # once decode has accepted the arguments
            for image, file in zip(images, files[start : start + args.batch_size], strict=True):
                image.save(file)
            bar.update(len(images))
    print(f"Wrote {len(files)} images to {output_dir}")


@command(
    *IMAGE_INPUTS,
    argument("--output-dir", required=True, help="folder for results.md/.csv/.json and the plots"),
    MODEL,
    argument("--budgets", type=positive_int, nargs="+", help="token counts (default 1, 2, 4, ..., all)"),
    argument("--steps", type=positive_int, nargs="+", default=[25], help="decoder steps, one setting each"),
    argument("--samplers", nargs="+", default=["euler"], help="flow-matching samplers, one setting each: euler, heun"),
    GUIDANCE_SCALE,
    argument("--features", help="rFID features: Inception TorchScript .pt file or a vision model folder"),
    argument("--perceptual-model", help="vision model folder for the perceptual distance (e.g. DINOv2)"),
    argument("--grid", type=int, default=0, help="also save the reconstructions of this many images, as a grid"),
    SEED,
    BATCH_SIZE,
    DEVICE,
    DTYPE,
)
def evaluate(args):
    """Reconstruction quality per token budget (the rate-distortion curve): markdown, CSV, JSON and plots.

    Every image is encoded once, and the prefixes of all budgets decode in one batch; see
    flextok_hf.evaluation.rate_distortion, whose functions this runs.
    """
    from .evaluation.features import load_image_feature_extractor
    from .evaluation.rate_distortion import SAMPLERS, evaluate_token_budgets, save_reconstruction_grid, write_report

    if unknown := sorted(set(args.samplers) - set(SAMPLERS)):
        raise ValueError(f"--samplers must be among {sorted(SAMPLERS)}, got {unknown}.")
    require_package("matplotlib", "matplotlib", "Plotting the results")
    if args.features:
        check_local_path(args.features, "--features file or folder")
    if args.perceptual_model:
        check_local_path(args.perceptual_model, "--perceptual-model folder")
    files = image_files_to_read(args)
    model = load_tokenizer(args)
    extractors = [
        load_image_feature_extractor(path).to(model.device) if path else None
        for path in (args.features, args.perceptual_model)
    ]
    quiet_decoding()
    rows, kept = evaluate_token_budgets(
        model,
        (images for _, images in image_batches(args, files, model)),
        budgets=args.budgets,
        num_inference_steps=args.steps,
        schedulers={name: SAMPLERS[name]() for name in args.samplers},
        guidance_scale=args.guidance_scale,
        feature_extractor=extractors[0],
        perceptual_extractor=extractors[1],
        seed=args.seed,
        keep_images=args.grid,
    )
    output_dir = Path(args.output_dir)
    write_report(rows, output_dir, title=f"{args.model} on {args.dataset or ', '.join(args.inputs)}")
    if kept:
        save_reconstruction_grid(kept, output_dir / "reconstructions.png")
    print((output_dir / "results.md").read_text())


@command(
    argument("--pipeline", required=True, help="a saved FlexTokPipeline folder (or Hub repo id)"),
    argument("--class-labels", type=int, nargs="+", help="class ids, for a class-conditional pipeline"),
    argument("--prompt", nargs="+", help="text prompts, for a text-conditional pipeline"),
    argument("--negative-prompt", help="what the images should not show (with --prompt)"),
    argument("--output-dir", required=True, help="folder for the PNGs: 00000.png, 00001.png, ... in order"),
    argument("--num-tokens", type=positive_int, help="tokens per image (default: all)"),
    argument("--num-images-per-prompt", type=positive_int, default=1, help="images per label or prompt"),
    argument("--guidance-scale", type=float, default=4.0, help="the token sampler's guidance; 1 disables it"),
    argument("--decoder-guidance-scale", type=float, default=7.5, help="the decoder's guidance; 1 disables it"),
    argument("--temperature", type=float, default=1.0),
    argument("--top-k", type=positive_int),
    argument("--top-p", type=float),
    STEPS,
    SEED,
    argument("--batch-size", type=positive_int, default=8, help="labels or prompts per pipeline call (default 8)"),
    DEVICE,
    DTYPE,
)
def generate(args):
    """Generate images for class labels or text prompts with a saved FlexTokPipeline, one PNG each.

    The images of one label or prompt are adjacent; with --num-images-per-prompt 2, 00000.png and 00001.png are
    the first label's.
    """
    import torch

    from .pipelines.pipeline_flextok import FlexTokPipeline

    if (args.class_labels is None) == (args.prompt is None):
        raise ValueError("Give --class-labels or --prompt (not both).")
    check_local_path(args.pipeline, "pipeline folder")
    device, dtype = torch_device_and_dtype(args)
    hide_progress_bars_off_terminal()
    pipe = FlexTokPipeline.from_pretrained(args.pipeline, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    conditions = args.class_labels if args.class_labels is not None else args.prompt
    key = "class_labels" if args.class_labels is not None else "prompt"
    extra = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
    generator = torch.Generator().manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    count = 0
    with progress_bar(len(conditions) * args.num_images_per_prompt, "Generating") as bar:
        for start in range(0, len(conditions), args.batch_size):
            images = pipe(
                **{key: conditions[start : start + args.batch_size]},
                **extra,
                num_tokens=args.num_tokens,
                num_images_per_prompt=args.num_images_per_prompt,
                guidance_scale=args.guidance_scale,
                decoder_guidance_scale=args.decoder_guidance_scale,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                num_inference_steps=args.steps,
                generator=generator,
            ).images
            output_dir.mkdir(parents=True, exist_ok=True)  # once the pipeline has accepted the arguments
            for image in images:
                image.save(output_dir / f"{count:05d}.png")
                count += 1
            bar.update(len(images))
    print(f"Wrote {count} images to {output_dir}")


@command(
    argument("source", help="released checkpoint: folder, single .safetensors file or Hub repo id"),
    argument("output_dir", help="folder to write (config.json, model.safetensors, README.md)"),
    argument("--vae-config", help="VAE config JSON or folder, instead of the VAE repo the checkpoint names"),
    argument("--push-to-hub", metavar="REPO_ID", help="also upload the converted model to this Hub repo"),
)
def convert(args):
    """Convert a released FlexTok checkpoint (apple/ml-flextok format) to the flextok-hf format."""
    from .convert_flextok_checkpoint import convert_checkpoint

    check_flextok_checkpoint(args.source, "checkpoint")
    hide_progress_bars_off_terminal()
    convert_checkpoint(args.source, args.output_dir, vae_config=args.vae_config, push_to_hub=args.push_to_hub)
    print(f"Wrote {args.output_dir}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))


@command(
    argument("--model", default="random", help=MODEL_HELP + " (default)"),
    argument("--image", help="photo to tokenize, a path or URL (default: scikit-image's astronaut)"),
    argument("--output", default="reconstructions.png"),
    argument("--num-tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256]),
    STEPS,
    GUIDANCE_SCALE,
    SEED,
    DEVICE,
    DTYPE,
)
def reconstruct(args):
    """Tokenize a photo and write it beside its reconstructions from the first k tokens, for each k."""
    import PIL.Image
    import torch
    from diffusers.utils import load_image

    from .reconstruction_grid import reconstruction_grid

    if PIL.Image.registered_extensions().get(Path(args.output).suffix.lower()) not in PIL.Image.SAVE:
        raise ValueError(f"--output must end in an image type PIL writes (.png, .jpg, ...), got {args.output}.")
    if args.image is None:
        require_package("skimage", "scikit-image", "The default photo (no --image)")
        from skimage import data

        photo = PIL.Image.fromarray(data.astronaut())
    elif not args.image.startswith(("http://", "https://")) and not Path(args.image).is_file():
        raise InputError(f"No such image file: {args.image}")
    else:
        photo = load_image(args.image)
    grid, token_ids = reconstruction_grid(
        load_tokenizer(args),
        photo,
        args.num_tokens,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    )
    grid.save(args.output)
    print(f"{len(token_ids)} token ids, first 16: {token_ids[:16].tolist()}")
    print(f"Wrote {args.output}: the input, then reconstructions from {args.num_tokens} tokens")


TRAINING_COMMANDS = """\
Training runs the scripts in the training/ folder of the flextok-hf repository{found}, with accelerate
(pip install -e ".[train]"; any YAML setting can be overridden as --key value):

  # stage 0, the VAE (optional: the released EPFL-VILAB/flextok_vae_c16 is the default)
  accelerate launch training/train_vae.py --config training/configs/vae_f8c16.yaml \\
      --train_data "data/*.tar" --output_dir outputs/vae
  # stage 1, the tokenizer
  accelerate launch training/train_tokenizer.py --config training/configs/tokenizer_d18_d28.yaml \\
      --train_data "data/*.tar" --output_dir outputs/tokenizer
  # stage 2, the AR generator, on pre-tokenized data
  python training/pretokenize.py --tokenizer outputs/tokenizer/model --train_data ILSVRC/imagenet-1k \\
      --output_dir data/tokens
  accelerate launch training/train_ar.py --config training/configs/ar_d24_1.3b.yaml \\
      --token_data data/tokens --tokenizer_name_or_path outputs/tokenizer/model --export_pipeline true

training/configs/*_tiny_cpu.yaml train in minutes on a CPU. Data, resuming, the Hub: docs/training.md."""


@command()
def train(args):
    """Show how to train the VAE, the tokenizer and the generator (the scripts under training/)."""
    scripts = Path(__file__).resolve().parents[2] / "training"
    print(TRAINING_COMMANDS.format(found=f" (here: {scripts})" if (scripts / "train_tokenizer.py").is_file() else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flextok-hf",
        description="FlexTok tokenizer tools.",
        epilog="Exit status: 0 done, 1 input data the command cannot use, 2 usage error. See docs/cli.md.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (function, arguments) in COMMANDS.items():
        subparser = subparsers.add_parser(
            name,
            help=function.__doc__.splitlines()[0],
            description=inspect.cleandoc(function.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for names, options in arguments:
            subparser.add_argument(*names, **options)
        subparser.set_defaults(run=function)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    # Errors of the user's input, which the message explains: one line, no traceback.
    except (InputError, OSError) as error:  # OSError: files or models that are missing or unreadable
        parser.exit(EXIT_INPUT_ERROR, f"flextok-hf {args.command}: error: {one_line(error)}\n")
    except ValueError as error:  # argument values the models refuse
        parser.exit(EXIT_USAGE_ERROR, f"flextok-hf {args.command}: error: {one_line(error)}\n")


def run_subcommand(name: str, argv=None):
    main([name, *(sys.argv[1:] if argv is None else argv)])


# The single-purpose commands of earlier versions, kept as aliases (console scripts in setup.py).
convert_main = partial(run_subcommand, "convert")
reconstruct_main = partial(run_subcommand, "reconstruct")


if __name__ == "__main__":
    main()
