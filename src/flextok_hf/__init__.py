"""flextok-hf: FlexTok (arXiv 2502.13967) as transformers models and a diffusers pipeline."""
