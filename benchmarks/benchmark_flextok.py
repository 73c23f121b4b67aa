"""GPU speed of flextok-hf at the released sizes (random weights, bf16), beside the reference implementation
(apple/ml-flextok) and the AR ceiling (`shared/reference/ar_ceiling.py`), measured in one process on one GPU.

    python benchmarks/benchmark_flextok.py --reference-src PATH/TO/ml-flextok --ceiling PATH/TO/ar_ceiling.py \\
        [--parts tokenizer ar pipeline ceiling] [--output benchmarks/results/h100.json]

Parts (each builds its own models, so each can run alone; `--output` merges the rows of several runs):
- `tokenizer`: d18-d28 (shared/reference/SPEC.md section 5: 256x256 images, batch 64, all 256 tokens, APG 7.5).
  Encode = VAE + encoder + FSQ. One decoder step (cond + uncond rows) = (detokenize with `--steps` steps - with 1
  step) / (steps - 1), for ours eager, ours with the VAE encoder, encoder and decoder compiled, and the reference
  (bf16 autocast, its own compiled FlexAttention path). MFU = the step's FLOPs (`torch.utils.flop_counter`) / time
  / bf16 peak.
- `ar`: `FlexTokARModel.generate_tokens` at the paper's largest AR size (hidden 2048, 24 layers, 16 heads,
  intermediate 5632, 64000 ids), class-conditional, CFG 4, top-k 1000, 256 tokens; eager and compiled
  (`compile_generation`), batch 64 and 1. "first call" is the first call at that batch size after a warm-up at
  another one: eagerly it shows any per-shape cost (cuDNN plans), compiled it is the compilation.
- `pipeline`: `FlexTokPipeline` with both models, `enable_compile()`, class-conditional, 256 tokens, 25 decoder
  steps with APG 7.5: warm-up (compilation included) and steady seconds per batch, at batch 64 and 1; peak memory.
- `ceiling`: the shared ceiling script's plain GPT, run as it is (its own printout is parsed).
Prints a table; writes `device`, `torch`, `date`, `command`, `rows` and `ratios` as JSON.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import io
import json
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch
from benchmark_training import peak_flops
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.utils.flop_counter import FlopCounterMode

from flextok_hf import FlexTokARConfig, FlexTokARModel, FlexTokModel, FlexTokPipeline
from flextok_hf.loading_reference import parse_reference_config
from flextok_hf.sampling import FlowGuidance

DEFAULT_CONFIG = Path(__file__).with_name("flextok_d18_d28_reference_config.json")
AR_SIZE = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=5632,
    vocab_size=64000,
    max_position_embeddings=256,
    num_classes=1000,
)
AR_SAMPLING = dict(guidance_scale=4.0, top_k=1000)
DECODER_GUIDANCE = dict(guidance_scale=7.5, norm_guidance=True)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def release_memory():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def decoder_step_flops(model: FlexTokModel, ids: torch.Tensor) -> float:
    """FLOPs of one guided decoder call (cond + uncond rows), counted eagerly."""
    codes, keep_k = model.prepare_registers(ids)
    latents = model.prepare_latents(len(ids), 256, 256, device=ids.device)
    guidance = FlowGuidance(DECODER_GUIDANCE["guidance_scale"], "apg")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.guided_velocity(latents, 0.5, codes, keep_k, guidance, guidance.new_momentum_buffer())
    return counter.get_total_flops()


def measure_tokenizer(
    record,
    nodes: dict,
    images: torch.Tensor,
    steps: int,
    reference_src: str | None,
    compile_mode: str | None = None,
):
    config, _ = parse_reference_config(nodes)

    def add(implementation, encode, detokenize, extra=None):
        start = time.perf_counter()
        encode()  # warm-ups (compilation included)
        detokenize(1)
        warm_up_s = time.perf_counter() - start
        release_memory()
        encode_s = min(timed(encode) for _ in range(3))
        one_step_s = timed(lambda: detokenize(1))
        all_steps_s = timed(lambda: detokenize(steps))
        record(
            dict(
                name=f"tokenizer {implementation}",
                encode_s=encode_s,
                decode_step_s=(all_steps_s - one_step_s) / (steps - 1),
                detokenize_s=all_steps_s,
                warm_up_s=warm_up_s,
                peak_memory_gib=peak_gib(),
                **(extra or {}),
            )
        )

    def add_ours(compiled):
        release_memory()
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = FlexTokModel(config).to(torch.bfloat16).eval()
        ids = model.encode(images)
        extra = {"decode_step_tflop": decoder_step_flops(model, ids) / 1e12}
        if compiled:
            model.vae.encoder.compile(mode=compile_mode)
            model.encoder.compile(mode=compile_mode)
            model.decoder.compile(mode=compile_mode)
        name = "flextok-hf, compiled" if compiled else "flextok-hf"
        if compile_mode:
            name += f" ({compile_mode})"
        with torch.no_grad():
            add(
                name,
                lambda: model.encode(images),
                lambda n: model.decode(ids, num_inference_steps=n, progress_bar=iter, **DECODER_GUIDANCE),
                extra,
            )

    if reference_src:
        # The reference is read from a local checkout and never part of this project.
        sys.path.insert(0, str(reference_src))
        from flextok.flextok_wrapper import FlexTokFromHub

        release_memory()
        torch.manual_seed(0)
        with torch.device("cuda"):
            reference = FlexTokFromHub(copy.deepcopy(nodes)).eval()
        guidance = dict(guidance_scale=7.5, perform_norm_guidance=True, verbose=False, vae_image_sizes=32)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            reference_ids = reference.tokenize(images)
            add(
                "reference (bf16 autocast)",
                lambda: reference.tokenize(images),
                lambda n: reference.detokenize(reference_ids, timesteps=n, **guidance),
            )
        del reference
    if not compile_mode:
        add_ours(compiled=False)
    add_ours(compiled=True)


def new_ar_model() -> FlexTokARModel:
    release_memory()
    torch.manual_seed(0)
    with torch.device("cuda"):
        return FlexTokARModel(FlexTokARConfig(**AR_SIZE)).to(torch.bfloat16).eval()


def generate(model: FlexTokARModel, batch: int, num_tokens: int = 256) -> torch.Tensor:
    labels = torch.arange(batch, device="cuda") % AR_SIZE["num_classes"]
    generator = torch.Generator("cuda").manual_seed(0)
    return model.generate_tokens(class_labels=labels, num_tokens=num_tokens, generator=generator, **AR_SAMPLING)


def measure_ar(record):
    model = new_ar_model()
    generate(model, 8, num_tokens=16)  # CUDA and cuBLAS start-up, at a batch size measured nowhere
    for compiled in (False, True):
        if compiled:
            model.compile_generation()
        for batch in (64, 1):
            torch.cuda.reset_peak_memory_stats()
            call = partial(generate, model, batch)
            first_s = timed(call)
            steady_s = min(timed(call) for _ in range(2))
            record(
                dict(
                    name=f"AR 1.5B bs{batch}" + (" compiled" if compiled else " eager"),
                    first_call_s=first_s,
                    steady_s=steady_s,
                    step_ms=steady_s / 256 * 1e3,
                    peak_memory_gib=peak_gib(),
                )
            )


def measure_ceiling(record, ceiling_path: str):
    # Run the shared ceiling script's own `bench` unchanged, so its figure is exactly what it measures.
    spec = importlib.util.spec_from_file_location("ar_ceiling", ceiling_path)
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    for batch, compiled in ((1, True), (64, True), (64, False)):
        release_memory()
        printout = io.StringIO()
        with contextlib.redirect_stdout(printout):
            ceiling.bench(batch, compile_=compiled)
        text = printout.getvalue()
        print(text, end="", flush=True)
        first_s = float(re.search(r"first call ([\d.]+) s", text).group(1))
        step_ms = float(re.search(r"= ([\d.]+) ms/step", text).group(1))
        name = f"AR ceiling bs{batch}" + (" compiled" if compiled else " eager")
        record(dict(name=name, first_call_s=first_s, step_ms=step_ms, steady_s=step_ms * 256 / 1e3))


def measure_pipeline(record, nodes: dict):
    config, _ = parse_reference_config(nodes)
    ar_model = new_ar_model()
    with torch.device("cuda"):
        flextok = FlexTokModel(config).to(torch.bfloat16).eval()
    pipe = FlexTokPipeline(ar_model=ar_model, flextok=flextok, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_compile()

    def call(batch):
        return pipe(
            class_labels=[label % AR_SIZE["num_classes"] for label in range(batch)],
            num_tokens=256,
            num_inference_steps=25,
            decoder_guidance_scale=DECODER_GUIDANCE["guidance_scale"],
            decoder_norm_guidance=DECODER_GUIDANCE["norm_guidance"],
            generator=torch.Generator("cuda").manual_seed(0),
            output_type="pt",
            **AR_SAMPLING,
        )

    for batch in (64, 1):
        warm_up_s = timed(partial(call, batch))
        torch.cuda.reset_peak_memory_stats()
        steady_s = min(timed(partial(call, batch)) for _ in range(2))
        record(
            dict(
                name=f"pipeline bs{batch} compiled", warm_up_s=warm_up_s, steady_s=steady_s, peak_memory_gib=peak_gib()
            )
        )


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    def value(name, key):
        return rows[name][key] if name in rows else float("nan")

    ours, compiled, reference = "tokenizer flextok-hf", "tokenizer flextok-hf, compiled", "tokenizer reference"
    reference = next((name for name in rows if name.startswith(reference)), reference)
    # The fastest compiled configuration (default mode or another `--compile-mode`).
    compiled_rows = [name for name in rows if name.startswith(compiled)]
    compiled = min(compiled_rows, key=lambda name: rows[name]["decode_step_s"], default=compiled)
    return {
        "encode_vs_reference": value(reference, "encode_s") / value(ours, "encode_s"),
        "encode_compiled_vs_reference": value(reference, "encode_s") / value(compiled, "encode_s"),
        "decode_step_eager_vs_reference": value(reference, "decode_step_s") / value(ours, "decode_step_s"),
        "decode_step_compiled_vs_reference": value(reference, "decode_step_s") / value(compiled, "decode_step_s"),
        "decode_step_compiled_mfu": value(compiled, "decode_step_tflop")
        * 1e12
        / value(compiled, "decode_step_s")
        / peak_flops(),
        "ar_step_ms_bs64_compiled": value("AR 1.5B bs64 compiled", "step_ms"),
        "ar_step_ms_bs1_compiled": value("AR 1.5B bs1 compiled", "step_ms"),
        "ar_step_ms_bs64_eager": value("AR 1.5B bs64 eager", "step_ms"),
        "ar_first_call_over_steady_bs64_eager": value("AR 1.5B bs64 eager", "first_call_s")
        / value("AR 1.5B bs64 eager", "steady_s"),
        "pipeline_seconds_bs64_compiled": value("pipeline bs64 compiled", "steady_s"),
        "pipeline_seconds_bs1_compiled": value("pipeline bs1 compiled", "steady_s"),
    }


def print_table(rows: dict[str, dict]):
    columns = sorted({key for row in rows.values() for key in row} - {"name"})
    print("\n| " + " | ".join(["case", *columns]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        cells = [f"{row[key]:.4g}" if key in row else "" for key in columns]
        print("| " + " | ".join([name, *cells]) + " |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["tokenizer", "ar", "pipeline", "ceiling"])
    parser.add_argument("--batch", type=int, default=64, help="tokenizer batch")
    parser.add_argument("--steps", type=int, default=10, help="decoder steps timed per detokenize")
    parser.add_argument("--reference-src", help="folder holding the reference's `flextok` package")
    parser.add_argument("--ceiling", help="path of shared/reference/ar_ceiling.py")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="tokenizer config in the released (reference) format")
    parser.add_argument("--compile-mode", help="torch.compile mode of the compiled tokenizer (e.g. max-autotune)")
    parser.add_argument("--output", help="JSON file to write; rows of an existing file are kept unless re-measured")
    args = parser.parse_args()

    with open(args.config) as f:
        nodes = json.load(f)
    command = "python " + " ".join(sys.argv)
    results = {"rows": [], "command": []}
    if args.output and Path(args.output).exists():
        results = json.loads(Path(args.output).read_text())
    rows = {row["name"]: row for row in results["rows"]}

    def record(row):
        """Keeps one measured row and rewrites the JSON, so a run cut short still leaves what it measured."""
        print(row, flush=True)
        rows[row["name"]] = row
        results.update(
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            date=datetime.date.today().isoformat(),
            command=sorted({*results["command"], command}),
            rows=list(rows.values()),
            ratios=ratios(rows),
        )
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")

    if "tokenizer" in args.parts:
        images = torch.rand(args.batch, 3, 256, 256, device="cuda") * 2 - 1
        measure_tokenizer(record, nodes, images, args.steps, args.reference_src, args.compile_mode)
    if "ar" in args.parts:
        measure_ar(record)
    if "ceiling" in args.parts:
        measure_ceiling(record, args.ceiling)
    if "pipeline" in args.parts:
        measure_pipeline(record, nodes)

    print(f"\n{results['device']}, torch {results['torch']}")
    print_table(rows)
    print("\n" + "\n".join(f"{key}: {value:.3g}" for key, value in results["ratios"].items()))


if __name__ == "__main__":
    main()
