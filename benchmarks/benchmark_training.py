"""Training throughput of both stages on one GPU, through the training scripts' own step (`prepare_training` +
`optimizer_step`: accelerate, bf16 mixed precision, AdamW, clipping, EMA), with and without `torch.compile`.

    python benchmarks/benchmark_training.py [--tokenizer-batch 32] [--ar-batch 64] [--accumulation 1] [--steps 10] \
        [--stages tokenizer ar] [--modes eager compiled] [--compile-scope model] [--output FILE.json]

Stage 1: FlexTok d18-d28 (released shape, VAE frozen, random images 256x256), images/s. Stage 2: the AR generator
at the paper's largest size (hidden 2048, 24 layers, 64000 ids, 256 tokens), tokens/s. MFU = FLOPs of one
training step, counted by `torch.utils.flop_counter` (forward and backward, frozen VAE included), over the
measured time and the GPU's dense bf16 peak. A step is one optimiser step over `--accumulation` batches (gradient
accumulation): the optimiser, clipping and EMA, which cost the same at any batch size, are paid once per step.
Prints a table; writes the rows as JSON.
"""

import argparse
import gc
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from flextok_hf import FlexTokARConfig, FlexTokARModel, FlexTokConfig, FlexTokModel
from flextok_hf.training.config import TrainingConfig
from flextok_hf.training.trainer import optimizer_step, prepare_training, trainable_parameters

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), float("nan"))


def tokenizer_case(batch: int):
    model = FlexTokModel(FlexTokConfig())
    images = torch.rand(batch, 3, 256, 256) * 2 - 1

    def loss(model, batch):
        return model(pixel_values=batch.cuda(non_blocking=True)).loss, {}

    return "tokenizer d18-d28", model, images, loss, batch, "images/s"


def ar_case(batch: int):
    config = FlexTokARConfig(
        vocab_size=64000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5632
    )
    model = FlexTokARModel(config)
    tokens = torch.randint(0, 64000, (batch, 256))
    labels = torch.randint(0, 1000, (batch,))

    def loss(model, batch):
        ids = batch[0].cuda(non_blocking=True)
        return model(input_ids=ids, class_labels=batch[1].cuda(non_blocking=True), labels=ids).loss, {}

    return "AR 1.3B (2048 x 24)", model, (tokens, labels), loss, batch * 256, "tokens/s"


def measure(
    case, compile_model: bool, steps: int, flops: float | None, accumulation: int = 1, compile_scope: str = "model"
) -> dict:
    """One row; `flops` of a step is counted here when not given (eagerly, also for a compiled model)."""
    name, model, batch, loss_fn, items_per_step, unit = case
    config = TrainingConfig(
        mixed_precision="bf16",
        compile=compile_model,
        compile_scope=compile_scope,
        report_to=None,
        lr_warmup_steps=1,
        gradient_accumulation_steps=accumulation,
    )
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=accumulation)
    model, optimizer, lr_scheduler, ema = prepare_training(config, accelerator, model.train())
    stream = iter(lambda: batch, None)
    parameters = trainable_parameters(model)

    def step():
        optimizer_step(config, accelerator, model, optimizer, lr_scheduler, loss_fn, stream)
        ema.step(parameters)

    start = time.perf_counter()
    step()  # compile, autotune, allocator warm-up
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    if flops is None:
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            optimizer_step(config, accelerator, model, optimizer, lr_scheduler, loss_fn, stream)
        flops = counter.get_total_flops()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    row = {
        "case": name,
        "compiled": compile_model,
        "compile_scope": compile_scope if compile_model else None,
        "accumulation": accumulation,
        "step_s": step_s,
        "first_step_s": first_s,
        "throughput": items_per_step * accumulation / step_s,
        "unit": unit,
        "tflops_per_step": flops / 1e12,
        "mfu": flops / step_s / peak_flops(),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    accelerator.free_memory()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-batch", type=int, default=16)
    parser.add_argument("--ar-batch", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=1, help="batches per optimiser step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stages", nargs="+", default=["tokenizer", "ar"], choices=["tokenizer", "ar"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--compile-scope", default="model", choices=["model", "blocks"], help="see TrainingConfig")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for stage in args.stages:
        flops = None
        for compile_model in [mode == "compiled" for mode in args.modes]:
            torch.manual_seed(0)
            case = tokenizer_case(args.tokenizer_batch) if stage == "tokenizer" else ar_case(args.ar_batch)
            rows.append(measure(case, compile_model, args.steps, flops, args.accumulation, args.compile_scope))
            gc.collect()
            torch.cuda.empty_cache()
            flops = rows[-1]["tflops_per_step"] * 1e12
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'case':<22}{'compiled':>9}{'step s':>9}{'throughput':>16}{'TFLOP/step':>12}{'MFU':>7}{'peak GiB':>10}")
    for r in rows:
        print(
            f"{r['case']:<22}{r['compiled']!s:>9}{r['step_s']:>9.3f}{r['throughput']:>10.0f} {r['unit']:<6}"
            f"{r['tflops_per_step']:>11.1f}{r['mfu']:>7.1%}{r['peak_memory_gib']:>10.1f}"
        )
    if args.output:
        result = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]),
            "rows": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
