"""flextok-hf: FlexTok (arXiv 2502.13967) as transformers models and a diffusers pipeline."""

from .configuration_flextok import FlexTokConfig
from .configuration_flextok_ar import FlexTokARConfig
from .modeling_flextok import (
    FlexTokDecoderOutput,
    FlexTokEncoderOutput,
    FlexTokModel,
    FlexTokOutput,
    FlexTokPreTrainedModel,
    FSQuantizer,
)
from .modeling_flextok_ar import FlexTokARModel, FlexTokARPreTrainedModel
from .pipelines.pipeline_flextok import FlexTokPipeline, FlexTokPipelineOutput

__all__ = [
    "FSQuantizer",
    "FlexTokARConfig",
    "FlexTokARModel",
    "FlexTokARPreTrainedModel",
    "FlexTokConfig",
    "FlexTokDecoderOutput",
    "FlexTokEncoderOutput",
    "FlexTokModel",
    "FlexTokOutput",
    "FlexTokPipeline",
    "FlexTokPipelineOutput",
    "FlexTokPreTrainedModel",
]
