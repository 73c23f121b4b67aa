"""The README's first example, offline: scikit-image's astronaut through a freshly initialised model."""

import PIL.Image

from flextok_hf.reconstruction_grid import main


def test_reconstruction_grid_writes_the_input_and_one_image_per_prefix(tmp_path):
    output = tmp_path / "grid.png"
    main(["--model", "random", "--output", str(output), "--num-tokens", "1", "16", "--steps", "1", "--device", "cpu"])
    grid = PIL.Image.open(output)
    assert grid.size == (3 * 256, 256)  # the photo, then reconstructions from 1 and 16 tokens
    left = grid.crop((0, 0, 256, 256)).convert("L")
    assert max(left.getextrema()) - min(left.getextrema()) > 100  # a real photo, not a blank tile
