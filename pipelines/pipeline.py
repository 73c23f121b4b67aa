"""Entry point for `DiffusionPipeline.from_pretrained(..., custom_pipeline=<this folder>, trust_remote_code=True)`:
diffusers loads a folder's `pipeline.py`, so this file only re-exports the pipeline defined in `pipeline_flextok.py`."""

from flextok_hf.pipelines.pipeline_flextok import FlexTokPipeline

__all__ = ["FlexTokPipeline"]
