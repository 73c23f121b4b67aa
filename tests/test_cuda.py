"""CUDA and bfloat16 paths; skipped on machines without a GPU (CI has none)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from test_evaluation import tiny_dinov2_extractor, to_pil, unit_images
from tiny_models import random_ar_model, random_flextok_model, random_images
from torch import nn

from flextok_hf import FlexTokPipeline
from flextok_hf.evaluation import clip_score, compute_metrics, frechet_distance, load_metric
from flextok_hf.training.trainer import compile_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32():
    """cuDNN convolutions (the VAE's) default to TF32, which alone moves float32 results by ~1e-4."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def relative_error(ours, reference):
    return ((ours.double().cpu() - reference.double().cpu()).norm() / reference.double().cpu().norm()).item()


def test_cuda_float32_matches_cpu(no_tf32):
    model = random_flextok_model()
    images = random_images(4)
    cpu_ids = model.encode(images)
    noise = model.prepare_latents(4, 16, 16, torch.Generator().manual_seed(0))
    cpu = model.decode(cpu_ids[:, :5], num_inference_steps=3, latents=noise).images
    model = model.to("cuda")
    cuda_ids = model.encode(images.cuda())
    assert (cuda_ids.cpu() == cpu_ids).float().mean() > 0.95  # a code at a rounding boundary may flip
    cuda = model.decode(cpu_ids[:, :5].cuda(), num_inference_steps=3, latents=noise.cuda()).images
    assert relative_error(cuda, cpu) < 1e-4


def test_cuda_generator_on_cpu_reproduces_cpu_noise():
    model = random_flextok_model().to("cuda")
    noise = model.prepare_latents(2, 16, 16, torch.Generator().manual_seed(5))
    assert noise.device.type == "cuda"
    assert torch.equal(noise.cpu(), model.to("cpu").prepare_latents(2, 16, 16, torch.Generator().manual_seed(5)))


def test_bfloat16_decode_is_close_to_float32():
    model = random_flextok_model().to("cuda")
    ids = model.encode(random_images(4).cuda())
    noise = model.prepare_latents(4, 16, 16, torch.Generator().manual_seed(0))
    reference = model.decode(ids[:, :5], num_inference_steps=3, latents=noise).latents
    low = model.to(torch.bfloat16).decode(ids[:, :5], num_inference_steps=3, latents=noise).latents
    assert low.dtype == torch.float32  # the Euler integration stays in float32
    assert relative_error(low, reference) < 5e-2


def test_training_step_in_bfloat16_autocast():
    model = random_flextok_model().to("cuda").train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(random_images(4).cuda()).loss
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.patch_embed.weight.grad is not None


def tiny_class_pipeline() -> FlexTokPipeline:
    flextok = random_flextok_model()
    config = flextok.config
    ar_model = random_ar_model(1, vocab_size=config.codebook_size, max_position_embeddings=config.num_registers)
    pipe = FlexTokPipeline(ar_model=ar_model, flextok=flextok, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_on_gpu_and_with_model_cpu_offload_agree():
    """A CPU generator drives sampling on the GPU; offloading moves each model in time and changes nothing."""
    kwargs = dict(class_labels=[1, 7], num_tokens=5, num_inference_steps=2, output_type="pt", return_tokens=True)
    on_gpu = tiny_class_pipeline().to("cuda")(generator=torch.Generator().manual_seed(0), **kwargs)
    offloaded_pipe = tiny_class_pipeline()
    offloaded_pipe.enable_model_cpu_offload(device="cuda")
    offloaded = offloaded_pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(on_gpu.tokens.cpu(), offloaded.tokens.cpu())
    assert relative_error(offloaded.images, on_gpu.images) < 1e-5


def test_compiled_generation_replays_cuda_graphs_and_keeps_the_tokens(no_tf32):
    """The compiled token step runs as CUDA graphs (no skip), at two batch sizes and twice each, and gives the eager
    path's ids: greedy, and sampled with the same generator (float32, so no rounding flips a draw)."""
    from torch._dynamo.utils import counters

    model = random_ar_model(max_position_embeddings=32, vocab_size=512).to("cuda")
    settings = [dict(do_sample=False), dict(temperature=1.5, top_k=50)]

    def generate(labels, setting):
        generator = torch.Generator("cuda").manual_seed(0)
        return model.generate_tokens(class_labels=labels, guidance_scale=3.0, generator=generator, **setting)

    batches = [torch.tensor([1, 7], device="cuda"), torch.arange(5, device="cuda")]
    eager = [generate(labels, setting) for labels in batches for setting in settings]
    counters.clear()
    model.compile_generation()
    for _ in range(2):
        compiled = [generate(labels, setting) for labels in batches for setting in settings]
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager, strict=True))
    assert not counters["inductor"]["cudagraph_skips"]


def test_compiled_pipeline_matches_the_eager_one(no_tf32):
    kwargs = dict(class_labels=[1, 7], num_tokens=5, num_inference_steps=2, output_type="pt", return_tokens=True)
    eager = tiny_class_pipeline().to("cuda")(generator=torch.Generator("cuda").manual_seed(0), **kwargs)
    pipe = tiny_class_pipeline().to("cuda")
    pipe.enable_compile()
    for _ in range(2):  # compiles, then replays
        compiled = pipe(generator=torch.Generator("cuda").manual_seed(0), **kwargs)
        assert torch.equal(compiled.tokens, eager.tokens)
        assert relative_error(compiled.images, eager.images) < 1e-4


class PooledLinearFeatures(nn.Module):
    """Features computed with weights, so that, like the TorchScript Inception, it takes inputs on its device only."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 8)

    def forward(self, images):
        return self.linear(F.adaptive_avg_pool2d(images, 4).flatten(1))


def test_metrics_run_where_the_extractors_are_else_where_the_images_are(no_tf32):
    references, predictions = ((unit_images(16, seed=seed) * 255).round() / 255 for seed in (0, 1))  # PNG-exact
    torch.manual_seed(0)
    features, embeddings = PooledLinearFeatures(), tiny_dinov2_extractor()
    texts = [f"caption {index}" for index in range(16)]

    def text_extractor(texts):
        return torch.linspace(-1, 1, 8 * len(texts)).view(len(texts), 8)  # on the CPU, whatever the images

    on_cpu = compute_metrics(predictions, references, feature_extractor=features, perceptual_extractor=embeddings)
    fid = frechet_distance(references, predictions, features)
    score = clip_score(predictions, texts, features, text_extractor)

    pixel_metrics = compute_metrics(predictions.cuda(), references.cuda())
    assert pixel_metrics == pytest.approx({name: on_cpu[name] for name in pixel_metrics}, rel=1e-5)
    features.cuda()
    embeddings.cuda()
    # CPU images, as the `evaluate` modules pass them, with extractors on the GPU.
    on_gpu = compute_metrics(predictions, references, feature_extractor=features, perceptual_extractor=embeddings)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)
    assert frechet_distance(references, predictions, features) == pytest.approx(fid, rel=1e-4)
    assert clip_score(predictions, texts, features, text_extractor) == pytest.approx(score, rel=1e-4, abs=1e-4)
    module = load_metric("frechet_distance").compute(
        predictions=to_pil(predictions), references=to_pil(references), feature_extractor=features
    )
    assert module["frechet_distance"] == pytest.approx(fid, rel=1e-4)


def test_training_with_compiled_blocks_matches_eager_on_cuda(no_tf32):
    """`compile_scope: blocks` through inductor's GPU kernels: the bf16 training loss and gradients of eager."""
    images = random_images(2).cuda()
    fixed = dict(
        noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).cuda(),
        sigmas=torch.tensor([0.3, 0.7]).cuda(),
        keep_k=torch.tensor([8, 2]).cuda(),
        null_condition_mask=torch.tensor([False, True]).cuda(),
    )
    results = []
    for scope in (None, "blocks"):
        model = random_flextok_model(seed=1).cuda().train()
        if scope is not None:
            compile_model(model, scope)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, **fixed).loss
        loss.backward()
        results.append((loss.detach().float(), model.decoder.blocks[0].attn.q_proj.weight.grad.float()))
    (loss, gradient), (compiled_loss, compiled_gradient) = results
    assert relative_error(compiled_loss, loss) < 2e-2 and relative_error(compiled_gradient, gradient) < 5e-2
