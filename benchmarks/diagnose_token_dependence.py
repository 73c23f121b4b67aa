"""Does a FlexTok trained from scratch learn to read its tokens? A CPU diagnostic on a tiny model.

    python benchmarks/diagnose_token_dependence.py [--steps 300] [--seeds 0 1 2] [--output FILE.json]

Trains a tiny tokenizer shaped like the GPU demo's (`training/configs/tokenizer_demo_128.yaml`: 8 x 8 patches,
64 registers, FSQ 8-8-8-5-5-5, one adaLN for patches and registers, null condition 10%), but 64 wide and 2 + 2 layers
deep, with the training scripts' own optimiser step
(AdamW, warm-up + cosine, clipping) twice per seed: with the released models' zero-initialised encoder head
(`encoder.to_latents`) and with this package's default small random one. Every `--log_every` steps it prints
`flextok_hf.training.tokenizer.token_dependence` on fixed noise: the flow loss with each image's own tokens, with
another image's tokens and with the null condition. While the decoder ignores its condition the three are equal.

The latents are procedural images themselves (16 x 16, 3 channels, unit variance), standing in for the latents of
a trained VAE: a random VAE's latents are mostly one fixed pattern, with little that tokens could describe.
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from flextok_hf import FlexTokConfig, FlexTokModel
from flextok_hf.configuration_flextok import DEFAULT_VAE_CONFIG
from flextok_hf.training.config import TrainingConfig
from flextok_hf.training.demo_data import procedural_image
from flextok_hf.training.tokenizer import token_dependence
from flextok_hf.training.trainer import optimizer_step, prepare_training

TINY_MODEL = dict(
    vae_config=dict(
        DEFAULT_VAE_CONFIG,
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=3,
    ),
    image_size=32,
    max_grid_size=8,
    num_registers=64,
    encoder_hidden_size=64,
    encoder_num_layers=2,
    encoder_head_dim=32,
    decoder_hidden_size=64,
    decoder_num_layers=2,
    decoder_head_dim=32,
    decoder_adaln_per_subsequence=False,
    null_condition_prob=0.1,
)


def image_latents(num_images: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Procedural images `[N, 3, size, size]`, scaled to unit variance like a VAE's scaled latents."""
    rng = np.random.default_rng(seed)
    images = np.stack([np.asarray(procedural_image(rng, size)) for _ in range(num_images)])
    latents = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return (latents - latents.mean()) / latents.std()


def train_and_probe(head_init: str, seed: int, latents: torch.Tensor, args) -> list[dict]:
    torch.manual_seed(seed)
    model = FlexTokModel(FlexTokConfig(**TINY_MODEL))
    if head_init == "zero":
        torch.nn.init.zeros_(model.encoder.to_latents.weight)
    config = TrainingConfig(
        learning_rate=args.learning_rate,
        lr_warmup_steps=args.steps // 6,
        max_train_steps=args.steps,
        train_batch_size=args.batch_size,
        use_ema=False,
        cpu=True,
    )
    accelerator = Accelerator(cpu=True)
    model, optimizer, lr_scheduler, _ = prepare_training(config, accelerator, model.train())
    generator = torch.Generator().manual_seed(seed)
    batches = (latents[torch.randperm(len(latents), generator=generator)[: args.batch_size]] for _ in itertools.count())

    def compute_loss(model, batch):
        return model(latents=batch).loss, {}

    probe_latents = latents[: args.probe_images]
    rows = []
    for step in range(args.steps + 1):
        if step % args.log_every == 0 or step == args.steps:
            losses = token_dependence(model, probe_latents, num_draws=4, seed=1000 + seed)
            with torch.no_grad():
                _, ids = model.quantizer(model.encoder(probe_latents))
            distinct = len({tuple(row) for row in ids.tolist()})
            rows.append({"head_init": head_init, "seed": seed, "step": step, **losses, "distinct_sequences": distinct})
            print(
                f"{head_init:>7} seed {seed} step {step:4d}: true {losses['flow_loss_true_tokens']:.4f} "
                f"shuffled {losses['flow_loss_shuffled_tokens']:.4f} null {losses['flow_loss_null_condition']:.4f} "
                f"distinct token sequences {distinct}/{len(probe_latents)}",
                flush=True,
            )
        if step < args.steps:
            optimizer_step(config, accelerator, model, optimizer, lr_scheduler, compute_loss, batches)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images", type=int, default=128, help="training images")
    parser.add_argument("--probe_images", type=int, default=32, help="of them, the ones token_dependence sees")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="write every row as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    latents = image_latents(args.images)
    rows = [
        row
        for seed in args.seeds
        for head_init in ("zero", "default")
        for row in train_and_probe(head_init, seed, latents, args)
    ]
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
