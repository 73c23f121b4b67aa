"""The shipped training configs parse, and the AR configs build generators of the size their names give."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from flextok_hf import FlexTokARConfig, FlexTokARModel, FlexTokConfig
from flextok_hf.training.ar import ARTrainingConfig
from flextok_hf.training.config import parse_config
from flextok_hf.training.tokenizer import TokenizerTrainingConfig
from flextok_hf.training.vae import VAETrainingConfig

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
STAGES = {"ar": ARTrainingConfig, "tokenizer": TokenizerTrainingConfig, "vae": VAETrainingConfig}


# accelerate_*.yaml are launch configs, read by `accelerate launch --config_file`
TRAINING_CONFIGS = sorted(path for path in CONFIGS.glob("*.yaml") if path.stem.split("_")[0] in STAGES)


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda path: path.stem)
def test_config_parses(path):
    stage = path.stem.split("_")[0]
    settings = yaml.safe_load(path.read_text())
    # the tiny CPU config leaves the data to the command line, as the tests give it
    data = ["--token_data", "tokens"] if stage == "ar" and not {"token_data", "train_data"} & set(settings) else []
    config = parse_config(STAGES[stage], ["--config", str(path), *data])
    if stage == "tokenizer" and config.model:
        FlexTokConfig(**config.model)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("ar_d*_*.yaml")), ids=lambda path: path.stem)
def test_ar_config_size_matches_its_name(path):
    config = parse_config(ARTrainingConfig, ["--config", str(path)])
    with torch.device("meta"):
        model = FlexTokARModel(FlexTokARConfig(**config.model))
    blocks = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))
    number, unit = re.fullmatch(r"ar_d\d+_([\d.]+)([mb])", path.stem).groups()
    named = float(number) * (1e6 if unit == "m" else 1e9)
    assert abs(blocks - named) / named < 0.15, f"{blocks / 1e6:.0f} M parameters in the blocks"
