"""Does the demo tokenizer read its tokens? Plots the token-dependence losses its training run logged (flow loss with
the images' own tokens, another image's tokens, the null condition; `flextok_hf.training.tokenizer.token_dependence`)
and measures them on held-out images with the exported model.

    python training/demo/plot_token_dependence.py --run outputs/demo/tokenizer --images outputs/demo/data/test \
        --output_dir outputs/demo/evaluation

Writes `token_dependence.png` (left: training images, per logging step; right: held-out images, final model) and
`token_dependence.json` (the held-out losses).
"""

import argparse
import json
from pathlib import Path

import torch

from flextok_hf import FlexTokModel
from flextok_hf.evaluation.rate_distortion import image_batches
from flextok_hf.training.tokenizer import token_dependence

CONDITIONS = {
    "flow_loss_true_tokens": "own tokens",
    "flow_loss_shuffled_tokens": "shuffled tokens",
    "flow_loss_null_condition": "null condition",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="train_tokenizer.py output_dir (logs.jsonl, model/)")
    parser.add_argument("--images", required=True, help="held-out images (folder, shard glob or dataset)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--max_images", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [json.loads(line) for line in (args.run / "logs.jsonl").read_text().splitlines()]
    logs = [entry for entry in logs if "flow_loss_true_tokens" in entry]
    model = FlexTokModel.from_pretrained(args.run / "model").to(args.device).eval()
    images = torch.cat(list(image_batches(args.images, model.config.image_size, 16, args.max_images)))
    with torch.no_grad():
        latents = model.encode_latents(images)
    held_out = token_dependence(model, latents, num_draws=8)

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in CONDITIONS.items():
        curves.plot([entry["step"] for entry in logs], [entry[key] for entry in logs], marker=".", label=label)
    curves.set(xlabel="training step", ylabel="flow loss", title="training images, fixed noise", yscale="log")
    curves.legend()
    curves.grid(alpha=0.3)
    drawn = bars.bar(list(CONDITIONS.values()), [held_out[key] for key in CONDITIONS], color=["C0", "C1", "C2"])
    bars.bar_label(drawn, fmt="%.3f")
    bars.set(ylabel="flow loss", title=f"{len(images)} held-out images, final model")
    figure.tight_layout()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output_dir / "token_dependence.png", dpi=120)
    (args.output_dir / "token_dependence.json").write_text(json.dumps(held_out, indent=2) + "\n")
    print(json.dumps(held_out, indent=2))


if __name__ == "__main__":
    main()
