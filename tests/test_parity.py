"""Parity with the reference implementation on every vector set in the reference folder.

The folder is `$FLEXTOK_HF_REFERENCE` if set, else `../shared/reference` beside the project. Each `vectors*/`
folder holds a checkpoint in both released formats, `vae_config.json`, `vectors.json` (sizes, runs) and
`vectors.safetensors` (inputs, intermediate and final outputs of the reference on random weights).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flextok_hf import FlexTokModel

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("FLEXTOK_HF_REFERENCE", PROJECT_ROOT.parent / "shared" / "reference"))
VECTOR_SETS = sorted(p for p in REFERENCE_DIR.glob("vectors*") if p.is_dir()) if REFERENCE_DIR.is_dir() else []
CHECKPOINT_FORMATS = {
    "hub_format": lambda d: d / "checkpoint",
    "metadata_format": lambda d: next((d / "checkpoint_metadata_format").glob("*.safetensors")),
}
TOLERANCE = 1e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.fixture(scope="module", params=VECTOR_SETS or [None], ids=lambda p: p.name if p else "none")
def vector_set(request):
    if request.param is None:
        pytest.skip(f"no reference vector sets found in {REFERENCE_DIR} (set FLEXTOK_HF_REFERENCE)")
    folder = request.param
    with open(folder / "vectors.json") as f:
        description = json.load(f)
    return folder, description, load_file(str(folder / "vectors.safetensors"))


@pytest.fixture(scope="module", params=list(CHECKPOINT_FORMATS))
def reference_model(request, vector_set):
    folder = vector_set[0]
    source = CHECKPOINT_FORMATS[request.param](folder)
    return FlexTokModel.from_pretrained(source, vae_config=folder / "vae_config.json")


def test_parity_tokenize(reference_model, vector_set):
    _, _, vectors = vector_set
    out = reference_model.encode(vectors["images"], return_dict=True)
    assert relative_error(out.latents, vectors["vae_latents"]) <= TOLERANCE
    assert relative_error(out.codes, vectors["quants"]) <= TOLERANCE
    assert torch.equal(out.token_ids, vectors["tokens"])
    assert torch.equal(out.token_ids, vectors["tokenize_ids"])


def test_parity_fsq(reference_model, vector_set):
    _, _, vectors = vector_set
    quantizer = reference_model.quantizer
    codes, ids = quantizer(vectors["fsq_z"])
    assert torch.equal(codes, vectors["fsq_z_quant"])
    assert torch.equal(ids, vectors["fsq_z_tokens"])
    all_ids = torch.arange(quantizer.codebook_size)
    assert torch.equal(quantizer.indices_to_codes(all_ids), vectors["fsq_all_codes"])


@torch.no_grad()
def test_parity_decoder_velocity(reference_model, vector_set):
    _, _, vectors = vector_set
    batch = len(vectors["dec_noised"])
    inputs = (vectors["dec_noised"], vectors["dec_timesteps"], vectors["quants"], vectors["dec_keep_k"])
    cond = reference_model.decoder(*inputs)
    uncond = reference_model.decoder(*inputs, torch.ones(batch, dtype=torch.bool))
    assert relative_error(cond, vectors["dec_velocity_cond"]) <= TOLERANCE
    assert relative_error(uncond, vectors["dec_velocity_uncond"]) <= TOLERANCE


def test_parity_training_target(reference_model, vector_set):
    _, _, vectors = vector_set
    reference_model.eval()
    out = reference_model(vectors["images"], noise=vectors["fm_noise"], sigmas=vectors["fm_sigmas"])
    assert relative_error(out.noisy_latents, vectors["fm_noised"]) <= TOLERANCE
    assert relative_error(out.target_velocity, vectors["fm_velocity_target"]) <= TOLERANCE


def test_parity_detokenize(reference_model, vector_set):
    _, description, vectors = vector_set
    token_ids = [vectors[f"detok_ids_{i}"] for i in range(len(vectors["detok_initial_noise"]))]
    height, width = vectors["images"].shape[-2:]
    seed = description["seed_detok_generator"]
    noise = reference_model.prepare_latents(len(token_ids), height, width, torch.Generator().manual_seed(seed))
    assert torch.equal(noise, vectors["detok_initial_noise"])

    for run, settings in description["runs"].items():
        out = reference_model.decode(
            token_ids,
            num_inference_steps=description["detokenize_steps"],
            guidance_scale=settings["guidance_scale"],
            norm_guidance=settings["perform_norm_guidance"],
            generator=torch.Generator().manual_seed(seed),
            height=height,
            width=width,
        )
        assert relative_error(out.images, vectors[f"detok_images_{run}"]) <= TOLERANCE, run
        if f"detok_latents_{run}" in vectors:
            assert relative_error(out.latents, vectors[f"detok_latents_{run}"]) <= TOLERANCE, run
