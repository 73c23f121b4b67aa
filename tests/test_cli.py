"""The `flextok-hf` command line and its aliases."""

import json

import pytest
import torch
from reference_format import write_hub_format
from tiny_models import random_flextok_model, random_images

from flextok_hf import FlexTokModel
from flextok_hf.cli import COMMANDS, build_parser, convert_main, main


def test_subcommands_are_listed_with_their_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert set(COMMANDS) >= {"convert", "reconstruct"}
    assert all(name in help_text for name in COMMANDS)


def test_convert_subcommand_and_its_alias(tmp_path, capsys):
    original = random_flextok_model(seed=4)
    write_hub_format(original, tmp_path / "reference")
    main(["convert", str(tmp_path / "reference"), str(tmp_path / "converted")])
    convert_main([str(tmp_path / "reference"), str(tmp_path / "alias")])
    assert "Wrote" in capsys.readouterr().out
    images = random_images(2)
    for folder in ("converted", "alias"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["model_type"] == "flextok"
        assert torch.equal(FlexTokModel.from_pretrained(tmp_path / folder).encode(images), original.encode(images))


def test_bad_input_is_a_usage_error_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "--output", str(tmp_path / "grid.png"), "--num-tokens", "0", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "reconstruct: error: num_tokens must be an int in [1, 256], got 0" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_parser_routes_each_subcommand_to_its_function():
    args = build_parser().parse_args(["convert", "src", "out", "--push-to-hub", "me/flextok"])
    assert args.run is COMMANDS["convert"][0] and args.push_to_hub == "me/flextok"
