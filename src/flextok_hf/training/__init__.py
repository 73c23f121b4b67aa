"""Training FlexTok: the tokenizer and its VAE (stage 1) and the AR generator (stage 2).

Import what you need from the submodules (`config`, `data`, `trainer`, `checkpointing`, `losses`, `tokenizer`,
`vae`, `ar`, `pretokenize`, `hub`); this package imports nothing heavy on its own.
"""
