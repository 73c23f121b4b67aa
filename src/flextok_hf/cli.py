"""The `flextok-hf` command line, one subcommand per task:

    flextok-hf convert EPFL-VILAB/flextok_d18_d28_dfn ./flextok_d18_d28_dfn     # released format -> ours
    flextok-hf reconstruct --model random --output grid.png                      # offline, fresh random model
    flextok-hf reconstruct --model EPFL-VILAB/flextok_d18_d28_dfn --output grid.png

`flextok-convert` and `flextok-reconstruct` are aliases of the two subcommands. A subcommand is one function
`name(args)` decorated with `@command(argument(...), ...)`: its name, help (the docstring's first line) and
arguments come from there. Each imports what it needs when it runs, so `--help` answers without loading torch.
"""

import argparse
import sys
from functools import partial

COMMANDS = {}


def argument(*names, **options) -> tuple:
    """One `ArgumentParser.add_argument(*names, **options)` call, for `command`."""
    return names, options


def command(*arguments):
    """Registers the decorated `function(args)` as the subcommand named after it, taking `arguments`."""

    def register(function):
        COMMANDS[function.__name__.replace("_", "-")] = (function, arguments)
        return function

    return register


@command(
    argument("source", help="released checkpoint: folder, single .safetensors file or Hub repo id"),
    argument("output_dir", help="folder to write (config.json, model.safetensors, README.md)"),
    argument("--vae-config", help="VAE config JSON or folder, instead of the VAE repo the checkpoint names"),
    argument("--push-to-hub", metavar="REPO_ID", help="also upload the converted model to this Hub repo"),
)
def convert(args):
    """Convert a released FlexTok checkpoint (apple/ml-flextok format) to the flextok-hf format."""
    from .convert_flextok_checkpoint import convert_checkpoint

    convert_checkpoint(args.source, args.output_dir, vae_config=args.vae_config, push_to_hub=args.push_to_hub)
    print(f"Wrote {args.output_dir}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))


@command(
    argument("--model", default="random", help="'random' (a small fresh model), a Hub repo id or a folder"),
    argument("--image", help="photo to tokenize, a path or URL (default: scikit-image's astronaut)"),
    argument("--output", default="reconstructions.png"),
    argument("--num-tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256]),
    argument("--steps", type=int, default=25),
    argument("--guidance-scale", type=float, default=7.5),
    argument("--seed", type=int, default=0),
    argument("--device", help="default: cuda if available, else cpu"),
)
def reconstruct(args):
    """Tokenize a photo and write it beside its reconstructions from the first k tokens, for each k."""
    import PIL.Image
    import torch
    from diffusers.utils import load_image

    from .modeling_flextok import FlexTokModel
    from .reconstruction_grid import reconstruction_grid, small_random_model

    if args.image is None:
        from skimage import data  # pip install scikit-image

        photo = PIL.Image.fromarray(data.astronaut())
    else:
        photo = load_image(args.image)
    model = small_random_model(args.seed) if args.model == "random" else FlexTokModel.from_pretrained(args.model)
    model = model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid, token_ids = reconstruction_grid(
        model,
        photo,
        args.num_tokens,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    )
    grid.save(args.output)
    print(f"{len(token_ids)} token ids, first 16: {token_ids[:16].tolist()}")
    print(f"Wrote {args.output}: the input, then reconstructions from {args.num_tokens} tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flextok-hf", description="FlexTok tokenizer tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (function, arguments) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=function.__doc__.splitlines()[0], description=function.__doc__)
        for names, options in arguments:
            subparser.add_argument(*names, **options)
        subparser.set_defaults(run=function)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:  # bad input, which the message explains: no traceback
        parser.exit(2, f"flextok-hf {args.command}: error: {error}\n")


def run_subcommand(name: str, argv=None):
    main([name, *(sys.argv[1:] if argv is None else argv)])


# The single-purpose commands of earlier versions, kept as aliases (console scripts in setup.py).
convert_main = partial(run_subcommand, "convert")
reconstruct_main = partial(run_subcommand, "reconstruct")
