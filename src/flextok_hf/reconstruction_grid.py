"""A photo beside its reconstructions from the first 1, 4, 16, 64, 256 tokens (`flextok-hf reconstruct`)."""

import PIL.Image
import torch

from .configuration_flextok import FlexTokConfig
from .modeling_flextok import FlexTokModel
from .utils import check_num_tokens


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


@torch.no_grad()
def reconstruction_grid(
    model: FlexTokModel, photo: PIL.Image.Image, num_tokens=(1, 4, 16, 64, 256), **decode_kwargs
) -> tuple[PIL.Image.Image, torch.LongTensor]:
    """Tokenizes `photo` (resized and center-cropped to `config.image_size` by the model's `VaeImageProcessor`)
    and decodes the first k tokens for each k in `num_tokens`, in one batch. `decode_kwargs` go to
    [`~FlexTokModel.decode`].

    Returns:
        (the photo and its reconstructions side by side, one PIL image `size x (1 + len(num_tokens)) * size`;
        the photo's token ids `[num_registers]`).
    """
    lengths = [check_num_tokens(k, model.config.num_registers) for k in num_tokens]
    size = model.config.image_size
    pixels = model.image_processor.preprocess(photo, height=size, width=size, resize_mode="crop").to(model.device)
    generator = decode_kwargs.get("generator")  # decode may take one per token budget; the one image takes the first
    token_ids = model.encode(pixels, generator=generator[0] if isinstance(generator, list) else generator)[0]
    reconstructions = model.decode([token_ids[:k] for k in lengths], output_type="pt", **decode_kwargs).images
    row = torch.cat([pixels, reconstructions.to(pixels.dtype)]).float()
    grid = model.image_processor.postprocess(torch.cat(list(row), dim=2)[None], output_type="pil")[0]
    return grid, token_ids
