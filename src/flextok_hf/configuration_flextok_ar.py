"""Configuration of the FlexTok autoregressive generator."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.utils.type_validators import interval, probability


@strict
class FlexTokARConfig(PreTrainedConfig):
    r"""
    Configuration of [`FlexTokARModel`], a LlamaGen-style decoder-only transformer that predicts FlexTok image
    tokens one after the other, coarse to fine.

    Exactly one conditioning mode is chosen: class-conditional (`num_classes` set) or text-conditional
    (`text_hidden_size` set).

    Args:
        vocab_size (`int`, *optional*, defaults to 64000):
            Number of image token ids: the size of FlexTok's FSQ codebook (levels [8, 8, 8, 5, 5, 5]).
        max_position_embeddings (`int`, *optional*, defaults to 256):
            Most image tokens per image.
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the transformer.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 2048):
            Width of the SwiGLU MLP.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the RMS norms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of weights and embeddings.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities during training.
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention and MLP outputs before they join the residual stream.
        num_classes (`int`, *optional*, defaults to 1000):
            Number of classes for class-conditional generation; `None` for text-conditional models.
        class_dropout_prob (`float`, *optional*, defaults to 0.1):
            Probability that a training sample's class is replaced by the null class (for classifier-free guidance).
        text_hidden_size (`int`, *optional*):
            Hidden size of the text encoder whose hidden states condition a text-conditional model; `None` for
            class-conditional models.
        text_dropout_prob (`float`, *optional*, defaults to 0.1):
            Probability that a training sample's text is replaced by the learned null text.
    """

    model_type = "flextok_ar"

    vocab_size: int = interval(min=1)(default=64000)
    max_position_embeddings: int = interval(min=1)(default=256)
    hidden_size: int = interval(min=1)(default=768)
    num_hidden_layers: int = interval(min=1)(default=12)
    num_attention_heads: int = interval(min=1)(default=12)
    intermediate_size: int = interval(min=1)(default=2048)
    rms_norm_eps: float = interval(min=0, exclude_min=True)(default=1e-5)
    initializer_range: int | float = interval(min=0)(default=0.02)
    attention_dropout: int | float = probability(default=0.0)
    hidden_dropout: int | float = probability(default=0.0)
    num_classes: int | None = 1000
    class_dropout_prob: int | float = probability(default=0.1)
    text_hidden_size: int | None = None
    text_dropout_prob: int | float = probability(default=0.1)

    def validate_architecture(self):
        """Cross-field checks, run by `@strict` after the per-field type and range checks."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if (self.num_classes is None) == (self.text_hidden_size is None):
            raise ValueError(
                "Set exactly one of num_classes (class-conditional) or text_hidden_size (text-conditional), got "
                f"num_classes={self.num_classes}, text_hidden_size={self.text_hidden_size}."
            )
        for name in ("num_classes", "text_hidden_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or at least 1, got {getattr(self, name)}.")

    @property
    def is_text_conditional(self) -> bool:
        return self.text_hidden_size is not None


AutoConfig.register("flextok_ar", FlexTokARConfig)

__all__ = ["FlexTokARConfig"]
