"""Train a FlexTok autoregressive generator (stage 2) on pre-tokenised data, or on images tokenised on the fly.

    python training/pretokenize.py --tokenizer path/to/flextok --train_data "shards/*.tar" --output_dir data/tokens
    accelerate launch training/train_ar.py --config training/configs/ar_d12_85m.yaml --token_data data/tokens
    # or, tokenising every image at every pass (no pre-tokenised copy; the tokenizer runs beside the generator):
    accelerate launch training/train_ar.py --config training/configs/ar_d12_85m.yaml --token_data null \
        --train_data "shards/*.tar" --tokenizer_name_or_path path/to/flextok

With `--export_pipeline true` the exported folder is a whole `FlexTokPipeline` (tokenizer + generator + scheduler,
and the text encoder for text-conditional models), loadable with `FlexTokPipeline.from_pretrained`.
"""

from flextok_hf.training.ar import (
    ARTrainingConfig,
    ar_loss_function,
    build_ar_model,
    build_token_stream,
    check_token_data,
    collate_tokens,
)
from flextok_hf.training.config import parse_config
from flextok_hf.training.data import SkipCounter, build_training_stream, collate_images
from flextok_hf.training.hub import export_generator
from flextok_hf.training.trainer import build_accelerator, train


def main(argv=None):
    config = parse_config(ARTrainingConfig, argv)
    accelerator = build_accelerator(config)
    model = build_ar_model(config)
    on_the_fly = config.train_data is not None  # images, tokenised in the loss function
    if not on_the_fly:
        check_token_data(config, model.config)
    data_stats = SkipCounter()

    def data_part(index, count):
        if on_the_fly:
            return build_training_stream(config, index, count, data_stats)
        return build_token_stream(config, index, count)

    return train(
        config,
        accelerator,
        model,
        ar_loss_function(config, model.config, accelerator),
        data_part,
        collate_images if on_the_fly else collate_tokens,
        export=lambda model, folder, metrics: export_generator(model, folder, config, metrics),
        data_stats=data_stats if on_the_fly else None,
    )


if __name__ == "__main__":
    main()
