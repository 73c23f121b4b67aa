"""Feature extractors for the metrics: images `[B, 3, H, W]` in [0, 1] (or texts) -> embeddings `[B, D]`.

Every extractor is built from a model the caller loaded, from a local file or folder, or from a Hub id, which
transformers downloads unless it is cached (with `HF_HUB_OFFLINE=1` only cached ids load).
"""

from pathlib import Path

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer


class InceptionFeatureExtractor(nn.Module):
    """The 2048 pool features of Inception-v3 that FID is defined on, from the TorchScript file that StyleGAN2-ADA,
    EDM and clean-fid use (`inception-2015-12-05.pt`). It takes uint8 pixels of any size and resizes to 299 itself.

    Args:
        path (`str`): the local TorchScript file.
    """

    num_features = 2048  # read by torchmetrics' FID instead of probing the network with a dummy image

    def __init__(self, path: str | Path):
        super().__init__()
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [0, 1] -> features `[B, 2048]`."""
        pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)
        return self.model(pixels, return_features=True)


class ImageFeatureExtractor(nn.Module):
    """Image embeddings of a transformers vision model (DINOv2, CLIP, SigLIP, ...) with its own preprocessing.

    The embedding is the model's projected image embedding when it has one (`CLIPVisionModelWithProjection`, the
    image tower of `CLIPModel`), else its `pooler_output` (DINOv2: the normalised CLS token), else the first token.

    Args:
        model (`PreTrainedModel`): the vision model (or a two-tower model with `get_image_features`).
        image_processor: its image processor (resizing, cropping and normalisation).
    """

    def __init__(self, model: nn.Module, image_processor):
        super().__init__()
        self.model = model.eval()
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "ImageFeatureExtractor":
        return cls(AutoModel.from_pretrained(name_or_path, **kwargs), AutoImageProcessor.from_pretrained(name_or_path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [0, 1] -> float32 embeddings `[B, D]`."""
        inputs = self.image_processor(
            images=list(images.float().cpu()), do_rescale=False, input_data_format="channels_first", return_tensors="pt"
        )
        pixel_values = inputs.pixel_values.to(self.model.device, self.model.dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
        if getattr(output, "image_embeds", None) is not None:
            embeddings = output.image_embeds
        elif getattr(output, "pooler_output", None) is not None:
            embeddings = output.pooler_output
        else:
            embeddings = output.last_hidden_state[:, 0]
        return embeddings.float()  # torchmetrics' FID rounds its value to the features' dtype


class TextFeatureExtractor(nn.Module):
    """Text embeddings of a transformers text model: the projected embedding of CLIP-style models, else the mean of
    the last hidden states over the real tokens (the pooling sentence-transformers models such as all-MiniLM-L6-v2
    are trained with).

    Args:
        model (`PreTrainedModel`): the text model (or a two-tower model with `get_text_features`).
        tokenizer: its tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "TextFeatureExtractor":
        return cls(AutoModel.from_pretrained(name_or_path, **kwargs), AutoTokenizer.from_pretrained(name_or_path))

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        """B texts -> float32 embeddings `[B, D]`."""
        inputs = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        if hasattr(self.model, "get_text_features"):
            features = self.model.get_text_features(**inputs)
            return getattr(features, "pooler_output", features).float()  # a ModelOutput in transformers 5
        output = self.model(**inputs)
        if getattr(output, "text_embeds", None) is not None:
            return output.text_embeds.float()
        mask = inputs.attention_mask.unsqueeze(-1).float()
        return (output.last_hidden_state.float() * mask).sum(dim=1) / mask.sum(dim=1)


def load_image_feature_extractor(path: str | Path) -> nn.Module:
    """A `.pt` file is the TorchScript Inception of FID; anything else a transformers vision model (folder or id)."""
    if str(path).endswith(".pt"):
        return InceptionFeatureExtractor(path)
    return ImageFeatureExtractor.from_pretrained(str(path))
