"""Tokenize / detokenize throughput of FlexTokModel at the released d18-d28 size (random weights).

    python benchmarks/benchmark_flextok.py [--batch 64] [--steps 20] [--dtypes float32 bfloat16]

Prints a markdown table: tokenize time, one guided decoder step (cond + uncond), full detokenize, peak memory.
Settings follow shared/reference/SPEC.md section 5 (256x256, 256 tokens, APG 7.5), whose reference figures were
taken on an H100 with torch 2.11.
"""

import argparse
import time

import torch

from flextok_hf import FlexTokConfig, FlexTokModel


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False

    config = FlexTokConfig()  # d18 encoder, d28 decoder with per-subsequence adaLN: the SPEC's benchmark size
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = FlexTokModel(config).to("cuda", dtype).eval()
        images = torch.rand(args.batch, 3, 256, 256, device="cuda") * 2 - 1
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            tokenize = timed(lambda: model.encode(images))
            vae_encode = timed(lambda: model.encode_latents(images))
            ids = model.encode(images)
            codes = model.quantizer.indices_to_codes(ids)
            latents = torch.randn(args.batch, 16, 32, 32, device="cuda")
            keep_k = torch.full((args.batch,), 256, device="cuda")
            step = timed(lambda: model.guided_velocity(latents, 0.5, codes, keep_k, 7.5, None))
            detokenize = timed(
                lambda: model.decode(ids, num_inference_steps=args.steps, guidance_scale=7.5, progress_bar=iter),
                repeats=1,
            )
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append((dtype_name, tokenize, vae_encode, step, detokenize, peak))
        del model
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, {args.steps} steps, APG 7.5\n")
    print("| dtype | tokenize s (img/s) | VAE encode s | decoder step s | detokenize s (img/s) | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, tokenize, vae_encode, step, detokenize, peak in rows:
        print(
            f"| {name} | {tokenize:.3f} ({args.batch / tokenize:.0f}) | {vae_encode:.3f} | {step:.3f} | "
            f"{detokenize:.1f} ({args.batch / detokenize:.2f}) | {peak:.1f} |"
        )


if __name__ == "__main__":
    main()
