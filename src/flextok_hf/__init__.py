"""flextok-hf: FlexTok (arXiv 2502.13967) as transformers models and a diffusers pipeline.

`import flextok_hf` is cheap: each name below is imported on first use (transformers' `_LazyModule`), and FlexTok
joins transformers' `AutoConfig` / `AutoModel` as soon as those are imported (see `auto_registration`).
"""

import sys
from typing import TYPE_CHECKING

from transformers.utils import _LazyModule

from .auto_registration import register_with_auto_classes_on_import

_import_structure = {
    "configuration_flextok": ["FlexTokConfig"],
    "configuration_flextok_ar": ["FlexTokARConfig"],
    "modeling_flextok": [
        "FSQuantizer",
        "FlexTokDecoderOutput",
        "FlexTokEncoderOutput",
        "FlexTokModel",
        "FlexTokOutput",
        "FlexTokPreTrainedModel",
    ],
    "modeling_flextok_ar": ["FlexTokARModel", "FlexTokARPreTrainedModel"],
    "pipelines.pipeline_flextok": ["FlexTokPipeline", "FlexTokPipelineOutput"],
}
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

if TYPE_CHECKING:
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
else:
    sys.modules[__name__] = _LazyModule(__name__, globals()["__file__"], _import_structure, module_spec=__spec__)
    register_with_auto_classes_on_import()
