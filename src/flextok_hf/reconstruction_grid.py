"""Tokenize a photo and write a PNG grid of its reconstructions from the first 1, 4, 16, 64, 256 tokens.

    flextok-reconstruct --model random --output grid.png                       # offline, fresh random model
    flextok-reconstruct --model EPFL-VILAB/flextok_d18_d28_dfn --output grid.png   # released weights

Without `--image` the photo is scikit-image's astronaut (`pip install scikit-image`).
"""

import argparse

import numpy as np
import PIL.Image
import torch

from .configuration_flextok import FlexTokConfig
from .modeling_flextok import FlexTokModel


def small_random_model(seed: int = 0) -> FlexTokModel:
    """A freshly initialised FlexTok with the released VAE and token shapes but a small encoder and decoder, so
    the whole example runs in seconds on a CPU (its reconstructions are noise until trained). Its two
    zero-initialised output layers get random weights, so that tokens and reconstructions differ by image and
    by prefix length as they do in a trained model."""
    torch.manual_seed(seed)
    config = FlexTokConfig(encoder_hidden_size=128, encoder_num_layers=2, decoder_hidden_size=128, decoder_num_layers=2)
    model = FlexTokModel(config).eval()
    with torch.no_grad():
        for layer in (model.encoder.to_latents, model.decoder.output_proj):
            layer.weight.normal_(0.0, layer.in_features**-0.5)
    return model


def load_photo(path: str | None, size: int) -> torch.Tensor:
    """`[1, 3, size, size]` in [-1, 1], center-cropped and resized."""
    if path is None:
        from skimage import data

        image = PIL.Image.fromarray(data.astronaut())
    else:
        image = PIL.Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random", help="'random', a Hub id or a folder (either format)")
    parser.add_argument("--image", help="photo to tokenize (default: scikit-image's astronaut)")
    parser.add_argument("--output", default="reconstructions.png")
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = small_random_model(args.seed) if args.model == "random" else FlexTokModel.from_pretrained(args.model)
    model = model.to(args.device)
    image = load_photo(args.image, model.config.image_size).to(args.device)
    token_ids = model.encode(image)
    print(f"{model.config.num_registers} token ids, first 16: {token_ids[0, :16].tolist()}")
    lengths = [k for k in args.num_tokens if 1 <= k <= model.config.num_registers]
    if not lengths:
        parser.error(f"--num-tokens must include values in [1, {model.config.num_registers}]")
    prefixes = [token_ids[0, :k] for k in lengths]
    generator = torch.Generator().manual_seed(args.seed)
    reconstructions = model.decode(
        prefixes,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
        output_type="np",
    ).images
    original = (image[0].permute(1, 2, 0).cpu().numpy() + 1) / 2
    row = np.concatenate([original, *reconstructions], axis=1)
    PIL.Image.fromarray((row.clip(0, 1) * 255).round().astype(np.uint8)).save(args.output)
    print(f"Wrote {args.output}: the input, then reconstructions from {lengths} tokens")


if __name__ == "__main__":
    main()
