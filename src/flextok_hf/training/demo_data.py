"""A small image set anyone can build offline, for demo training runs: the photos that scikit-image and
scikit-learn ship, cut into random crops, scales and flips, plus simple procedural images. Photos listed in
`HELD_OUT_PHOTOS` go to `test/` only, so reconstructions of them show what the model learned, not memorised.
With `class_folders`, the training images are sorted into classes (the photo a crop comes from, the kind of shape a
procedural image draws) for class-conditional generation."""

from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

HELD_OUT_PHOTOS = ("astronaut", "china")
SHAPES = ("ellipses", "rectangles", "lines")


def bundled_photos() -> dict[str, np.ndarray]:
    """`name -> uint8 [H, W, 3]`: the RGB photos of at least 256 px that scikit-image and scikit-learn ship."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = {name: np.asarray(getattr(data, name)())[..., :3] for name in names}
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images, strict=True):
        photos[Path(filename).stem] = image
    return photos


def procedural_image(rng: np.random.Generator, size: int, shape: str | None = None) -> PIL.Image.Image:
    """A random gradient with a few random ellipses, rectangles and lines, or with `shape` (one of `SHAPES`) only."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES} or None, got {shape!r}.")
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    start, end = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    mix = np.clip(np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None], 0, 1)[..., None]
    image = PIL.Image.fromarray((start * (1 - mix) + end * mix).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 6)):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = SHAPES[rng.integers(3)] if shape is None else shape
        if kind == "ellipses":
            draw.ellipse(xy, fill=color)
        elif kind == "rectangles":
            draw.rectangle(xy, fill=color)
        else:
            draw.line(xy, fill=color, width=int(rng.integers(2, 12)))
    return image


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> PIL.Image.Image:
    """A square crop of 30% to 100% of the photo's shorter side, resized to `size`, flipped half the time."""
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.3, 1.0))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    image = PIL.Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), PIL.Image.BICUBIC)
    return image.transpose(PIL.Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def build_demo_image_folder(
    output_dir: str | Path,
    num_train: int = 2000,
    resolution: int = 256,
    procedural_fraction: float = 0.25,
    seed: int = 0,
    class_folders: bool = False,
) -> Path:
    """Writes `train/` (`num_train` PNGs: crops of the non-held-out photos and procedural images) and `test/` (the
    held-out photos, center-cropped, plus a few crops and procedural images of their own seed) under
    `output_dir`; returns `output_dir`.

    With `class_folders`, each training image goes to `train/<class>/`, the class being the photo's name or the
    procedural image's shape kind (`SHAPES`; each procedural image then draws one kind only): an image folder that
    `imagefolder` reads with labels, the class ids numbering the sorted folder names."""
    output_dir = Path(output_dir)
    (output_dir / "train").mkdir(parents=True, exist_ok=True)
    (output_dir / "test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    train_names = [name for name in photos if name not in HELD_OUT_PHOTOS]
    for index in range(num_train):
        if rng.random() < procedural_fraction:
            label = SHAPES[rng.integers(len(SHAPES))] if class_folders else None
            image = procedural_image(rng, resolution, shape=label)
        else:
            label = train_names[rng.integers(len(train_names))]
            image = random_crop(photos[label], rng, resolution)
        folder = output_dir / "train" / label if class_folders else output_dir / "train"
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{index:06d}.png", compress_level=1)  # several times faster to write
    test_rng = np.random.default_rng(seed + 1)
    for name in HELD_OUT_PHOTOS:
        photo = photos[name]
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        center = PIL.Image.fromarray(photo[top : top + side, left : left + side])
        center.resize((resolution, resolution), PIL.Image.BICUBIC).save(output_dir / "test" / f"{name}.png")
        for index in range(3):
            random_crop(photo, test_rng, resolution).save(output_dir / "test" / f"{name}_crop{index}.png")
    for index in range(4):
        procedural_image(test_rng, resolution).save(output_dir / "test" / f"procedural{index}.png")
    return output_dir
