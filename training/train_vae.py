"""Train or fine-tune the diffusers `AutoencoderKL` that a FlexTok tokenizer is trained on.

    accelerate launch training/train_vae.py --config training/configs/vae_f8c16.yaml \
        --train_data path/to/images --output_dir outputs/vae

The exported folder (`<output_dir>/model`) loads with `AutoencoderKL.from_pretrained` and is what
`train_tokenizer.py --vae_name_or_path` takes; its `scaling_factor` is measured on training images at export.
"""

import itertools

from flextok_hf.training.config import parse_config
from flextok_hf.training.data import SkipCounter, build_training_stream, collate_images
from flextok_hf.training.hub import export_model
from flextok_hf.training.trainer import build_accelerator, train
from flextok_hf.training.vae import VAETrainingConfig, build_vae, latent_scaling_factor, vae_loss_function

CALIBRATION_IMAGES = 64


def main(argv=None):
    config = parse_config(VAETrainingConfig, argv)
    accelerator = build_accelerator(config)
    model, perceptual = build_vae(config)
    data_stats = SkipCounter()

    def export(model, folder, metrics):
        calibration = build_training_stream(config, rank=0, world_size=1)
        images = collate_images(list(itertools.islice(calibration, CALIBRATION_IMAGES)))["pixel_values"]
        model.vae.register_to_config(scaling_factor=latent_scaling_factor(model.vae, images))
        export_model(model.vae, folder, config, metrics)

    return train(
        config,
        accelerator,
        model,
        vae_loss_function(perceptual, accelerator.device),
        lambda index, count: build_training_stream(config, index, count, data_stats),
        collate_images,
        export,
        data_stats,
    )


if __name__ == "__main__":
    main()
