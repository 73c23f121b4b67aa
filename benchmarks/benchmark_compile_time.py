"""How long `torch.compile` takes before the first training step of the tokenizer, by compile scope: the whole
model as one graph (`compile_scope: model`) or each transformer block on its own (`compile_scope: blocks`).

    python benchmarks/benchmark_compile_time.py [--device cpu] [--width 128] [--batch 2] [--output FILE.json]

The model has the released d18-d28's depth (18 encoder and 28 decoder blocks), its VAE and 256 registers; `--width`
narrows the transformers (and a small VAE stands in) so that the CPU measures the compiler rather than the
arithmetic: compile time grows with the number of operations in the graph, not with their size. Each scope runs in a
fresh process with an empty inductor cache. Prints a table; writes the rows as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flextok_hf import FlexTokConfig, FlexTokModel
from flextok_hf.configuration_flextok import DEFAULT_VAE_CONFIG
from flextok_hf.training.trainer import compile_model

SCOPES = ("eager", "blocks", "model")


def step_times(scope: str, device: str, width: int | None, batch: int, steps: int) -> list[float]:
    """Seconds of each forward + backward training step, the first one including compilation."""
    settings = {}
    if width is not None:
        settings = dict(
            encoder_hidden_size=width,
            decoder_hidden_size=width,
            encoder_head_dim=64,
            decoder_head_dim=64,
            image_size=64,
            vae_config=dict(DEFAULT_VAE_CONFIG, block_out_channels=[32, 32, 32, 32]),
        )
    torch.manual_seed(0)
    model = FlexTokModel(FlexTokConfig(**settings)).to(device).train()
    if scope != "eager":
        compile_model(model, scope)
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(pixel_values=images).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, help="transformer width (default: the released 1152 / 1792)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--scope", help=argparse.SUPPRESS)  # one measurement, in the child process
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step compiles, the later ones are timed")
    if args.scope:
        print(json.dumps(step_times(args.scope, args.device, args.width, args.batch, args.steps)))
        return

    rows = []
    for scope in args.scopes:
        with tempfile.TemporaryDirectory() as cache:
            child = [sys.executable, __file__, "--scope", scope, "--device", args.device, "--batch", str(args.batch)]
            child += ["--steps", str(args.steps)] + (["--width", str(args.width)] if args.width else [])
            result = subprocess.run(
                child, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, capture_output=True, text=True
            )
        if result.returncode:
            sys.exit(f"{scope}: {result.stderr[-2000:]}")
        times = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"scope": scope, "first_step_s": times[0], "step_s": min(times[1:])})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'scope':<8}{'first step s':>14}{'later step s':>14}")
    for row in rows:
        print(f"{row['scope']:<8}{row['first_step_s']:>14.1f}{row['step_s']:>14.3f}")
    if args.output:
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
        result = {"device": device, "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({**result, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
