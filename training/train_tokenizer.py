"""Train or fine-tune a FlexTok tokenizer (stage 1).

    accelerate launch training/train_tokenizer.py --config training/configs/tokenizer_d12_d12.yaml \
        --train_data "path/to/shards/*.tar" --output_dir outputs/d12

Every setting of `TokenizerTrainingConfig` can be given in the YAML file or overridden as `--key value`.
"""

import itertools

from flextok_hf.training.config import parse_config
from flextok_hf.training.data import SkipCounter, build_training_stream, collate_images
from flextok_hf.training.hub import export_model
from flextok_hf.training.tokenizer import (
    TokenizerTrainingConfig,
    build_tokenizer,
    token_dependence_evaluation,
    tokenizer_loss_function,
)
from flextok_hf.training.trainer import build_accelerator, train


def main(argv=None):
    config = parse_config(TokenizerTrainingConfig, argv)
    accelerator = build_accelerator(config)
    model, vision = build_tokenizer(config)
    data_stats = SkipCounter()
    evaluate = None
    if config.token_dependence_images:  # the same first images of the stream on every process
        probe = build_training_stream(config, rank=0, world_size=1)
        examples = list(itertools.islice(probe, config.token_dependence_images))
        if len(examples) < 2:
            raise ValueError(
                f"train_data has {len(examples)} usable image(s) (corrupt ones and those under min_image_size are "
                "skipped); the token_dependence check shuffles tokens among at least 2: add images or set "
                "token_dependence_images 0."
            )
        evaluate = token_dependence_evaluation(collate_images(examples)["pixel_values"])
    return train(
        config,
        accelerator,
        model,
        tokenizer_loss_function(vision, accelerator),
        lambda index, count: build_training_stream(config, index, count, data_stats),
        collate_images,
        export=lambda model, folder, metrics: export_model(model, folder, config, metrics),
        data_stats=data_stats,
        evaluate=evaluate,
    )


if __name__ == "__main__":
    main()
