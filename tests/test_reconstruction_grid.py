"""The README's first example, offline: scikit-image's astronaut through a freshly initialised model."""

import numpy as np
import PIL.Image
import torch
from tiny_models import random_flextok_model

from flextok_hf.cli import main
from flextok_hf.reconstruction_grid import reconstruction_grid


def test_reconstruction_grid_writes_the_input_and_one_image_per_prefix(tmp_path):
    output = tmp_path / "grid.png"
    main(["reconstruct", "--model", "random", "--output", str(output), "--num-tokens", "1", "16", "--steps", "1"])
    grid = PIL.Image.open(output)
    assert grid.size == (3 * 256, 256)  # the photo, then reconstructions from 1 and 16 tokens
    tiles = [np.asarray(grid.crop((256 * i, 0, 256 * (i + 1), 256)), dtype=np.float32) for i in range(3)]
    assert tiles[0].max() - tiles[0].min() > 100  # a real photo, not a blank tile
    assert np.abs(tiles[1] - tiles[2]).mean() > 1  # 1 and 16 tokens decode differently


def test_reconstruction_grid_takes_one_generator_per_budget():
    model = random_flextok_model(vae_sample_posterior=True)
    photo = PIL.Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))

    def grid(*seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return np.asarray(reconstruction_grid(model, photo, [1, 4], num_inference_steps=1, generator=generators)[0])

    np.testing.assert_array_equal(grid(0, 1), grid(0, 1))
    assert not np.array_equal(grid(0, 1), grid(2, 1))
