"""Tokenize / detokenize speed of FlexTokModel at the released d18-d28 size (random weights), optionally beside the
reference implementation (apple/ml-flextok) measured in the same process at the same settings.

    python benchmarks/benchmark_flextok.py [--batch 64] [--steps 20] [--reference-src PATH/TO/ml-flextok] [--compile]

Settings follow shared/reference/SPEC.md section 5: 256x256 images, all 256 tokens, APG 7.5, batch 64. Both models
are built from one config in the released format (default: `flextok_d18_d28_reference_config.json` beside this
script, the d18-d28 size with per-subsequence adaLN), which our loader maps onto `FlexTokConfig`.
"float32" runs both in float32 with PyTorch's default precision settings; "bfloat16" runs ours with bfloat16
weights and the reference under bfloat16 autocast, its documented fast path (compiled FlexAttention). One decoder
step (cond + uncond) is (detokenize with `steps` steps - detokenize with 1 step) / (steps - 1). Prints a table.
"""

import argparse
import copy
import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from flextok_hf import FlexTokModel
from flextok_hf.loading_reference import parse_reference_config

DEFAULT_CONFIG = Path(__file__).with_name("flextok_d18_d28_reference_config.json")


def timed(fn, repeats: int = 1) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(tokenize, detokenize, steps: int) -> dict:
    tokenize()  # warm-ups (and compilation, for the reference)
    detokenize(1)
    torch.cuda.reset_peak_memory_stats()
    tokenize_s = timed(tokenize, repeats=3)
    one_step_s = timed(lambda: detokenize(1))
    detokenize_s = timed(lambda: detokenize(steps))
    return {
        "tokenize": tokenize_s,
        "step": (detokenize_s - one_step_s) / (steps - 1),
        "detokenize": detokenize_s,
        "peak": torch.cuda.max_memory_allocated() / 2**30,
    }


def release_memory():
    gc.collect()
    torch.cuda.empty_cache()


def measure_ours(config, images, dtype, steps, compile_decoder=False):
    release_memory()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FlexTokModel(config).to(dtype).eval()
    if compile_decoder:
        model.decoder.compile()
    ids = model.encode(images)
    guidance = dict(guidance_scale=7.5, norm_guidance=True, progress_bar=iter)
    with torch.no_grad():
        return measure(
            lambda: model.encode(images), lambda n: model.decode(ids, num_inference_steps=n, **guidance), steps
        )


def measure_reference(nodes, images, dtype, steps, reference_src):
    # The reference is read from a local checkout and never part of this project.
    sys.path.insert(0, str(reference_src))
    from flextok.flextok_wrapper import FlexTokFromHub

    release_memory()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FlexTokFromHub(copy.deepcopy(nodes)).eval()
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.no_grad(), autocast:
        ids = model.tokenize(images)
        guidance = dict(guidance_scale=7.5, perform_norm_guidance=True, verbose=False, vae_image_sizes=32)
        return measure(lambda: model.tokenize(images), lambda n: model.detokenize(ids, timesteps=n, **guidance), steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reference-src", help="folder holding the reference's `flextok` package")
    parser.add_argument("--compile", action="store_true", help="also time ours with a torch.compile'd decoder")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="model config in the released (reference) format")
    args = parser.parse_args()

    with open(args.config) as f:
        nodes = json.load(f)
    config, _ = parse_reference_config(nodes)
    images = torch.rand(args.batch, 3, 256, 256, device="cuda") * 2 - 1
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        rows.append(("flextok-hf", dtype_name, measure_ours(config, images, dtype, args.steps)))
        if args.compile:
            compiled = measure_ours(config, images, dtype, args.steps, compile_decoder=True)
            rows.append(("flextok-hf, compiled decoder", dtype_name, compiled))
        if args.reference_src:
            reference = measure_reference(nodes, images, dtype, args.steps, args.reference_src)
            rows.append(("reference", dtype_name, reference))

    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, batch {args.batch}, {args.steps} steps, APG 7.5\n")
    print("| implementation | dtype | tokenize s (img/s) | decoder step s | detokenize s (img/s) | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, dtype_name, m in rows:
        print(
            f"| {name} | {dtype_name} | {m['tokenize']:.3f} ({args.batch / m['tokenize']:.0f}) | {m['step']:.3f} | "
            f"{m['detokenize']:.1f} ({args.batch / m['detokenize']:.2f}) | {m['peak']:.1f} |"
        )


if __name__ == "__main__":
    main()
