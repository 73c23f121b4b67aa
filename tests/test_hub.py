"""`push_to_hub` of the models and the pipeline, through huggingface_hub's own client code, against a fake Hub
on 127.0.0.1; and the model cards they carry."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from fake_hub import DECLINED, FakeHub
from huggingface_hub import ModelCard, constants
from tiny_models import random_ar_model, random_flextok_model, random_images

from flextok_hf import FlexTokARModel, FlexTokModel, FlexTokPipeline
from flextok_hf.hub_utils import create_model_card

RELEASED = "EPFL-VILAB/flextok_d18_d28_dfn"
TOKEN = "hf_test_token"


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub as huggingface_hub's endpoint, online for this test only. huggingface_hub reads HF_ENDPOINT
    and HF_HUB_OFFLINE once, at import, so its constants are patched beside the environment."""
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # With hf_xet installed, uploads would use the Xet storage protocol, which the fake does not speak.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield fake
        assert fake.unexpected == []
        api_calls = [(method, path, auth) for method, path, auth in fake.requests if path.startswith("/api/")]
        assert all(auth == f"Bearer {TOKEN}" for method, path, auth in api_calls if f"{method} {path}" not in DECLINED)


def pushed_card(hub, repo_id: str, folder: str = "") -> ModelCard:
    return ModelCard(hub.repos[repo_id][f"{folder}README.md"].decode())


def write_repo(hub, repo_id: str, folder):
    for path, content in hub.repos[repo_id].items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    return folder


def test_tokenizer_push_to_hub(hub, tmp_path):
    model = random_flextok_model()
    model.name_or_path = RELEASED  # as if converted from the released checkpoint by from_pretrained
    commit = model.push_to_hub("me/flextok-tiny", token=TOKEN)

    files = hub.repos["me/flextok-tiny"]
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert commit.oid and hub.lfs_uploads  # the weights went through LFS
    card = pushed_card(hub, "me/flextok-tiny")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-to-image"
    assert "flextok" in card.data.tags and card.data.base_model == [RELEASED]
    assert 'FlexTokModel.from_pretrained("me/flextok-tiny")' in card.text

    pushed = FlexTokModel.from_pretrained(write_repo(hub, "me/flextok-tiny", tmp_path))
    images = random_images(2)
    assert torch.equal(pushed.encode(images), model.encode(images))


def test_generator_push_to_hub(hub, tmp_path):
    model = random_ar_model()
    model.push_to_hub("me/flextok-ar-tiny", token=TOKEN, commit_message="first")

    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.repos["me/flextok-ar-tiny"])
    card = pushed_card(hub, "me/flextok-ar-tiny")
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.base_model is None
    assert "model.generate_tokens(class_labels=" in card.text
    pushed = FlexTokARModel.from_pretrained(write_repo(hub, "me/flextok-ar-tiny", tmp_path))
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in pushed.state_dict().items())


def test_pipeline_push_to_hub(hub, tmp_path):
    flextok = random_flextok_model()
    flextok.name_or_path = RELEASED
    ar_model = random_ar_model(vocab_size=flextok.config.codebook_size)
    pipe = FlexTokPipeline(ar_model=ar_model, flextok=flextok, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.push_to_hub("me/flextok-pipe", token=TOKEN)

    files = set(hub.repos["me/flextok-pipe"])
    assert {"model_index.json", "README.md", "scheduler/scheduler_config.json"} <= files
    assert {"ar_model/model.safetensors", "flextok/model.safetensors", "flextok/config.json"} <= files
    card = pushed_card(hub, "me/flextok-pipe")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.base_model == [RELEASED]
    assert 'FlexTokPipeline.from_pretrained("me/flextok-pipe")' in card.text
    pushed = FlexTokPipeline.from_pretrained(write_repo(hub, "me/flextok-pipe", tmp_path))
    assert torch.equal(pushed.flextok.encode(random_images(1)), flextok.encode(random_images(1)))


def test_save_pretrained_writes_the_card(tmp_path):
    model = random_flextok_model()
    model.save_pretrained(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.pipeline_tag == "image-to-image"


def test_card_records_training_for_training_scripts():
    card = create_model_card(
        random_ar_model(text_conditional=True),
        "me/t2i",
        datasets=["imagenet-1k"],
        training_steps=20000,
        metrics={"fid": 3.5},
        license="apache-2.0",
    )
    assert card.data.datasets == ["imagenet-1k"] and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-to-image"
    assert "training steps: 20,000" in card.text and "fid: 3.5" in card.text


def test_training_run_pushes_its_export_and_keeps_it_when_the_upload_fails(hub, monkeypatch, tmp_path):
    from test_training_runs import TOKENIZER_CONFIG, run_script

    from flextok_hf.training import hub as training_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        PIL.Image.fromarray((np.random.default_rng(index).random((32, 32, 3)) * 255).astype(np.uint8)).save(
            images / f"{index}.png"
        )
    argv = ["--config", TOKENIZER_CONFIG, "--train_data", str(images), "--max_train_steps", "2"]
    argv += ["--push_to_hub", "true", "--hub_model_id", "me/trained"]
    run_script("train_tokenizer", argv + ["--output_dir", str(tmp_path / "pushed")])
    exported = tmp_path / "pushed" / "model" / "model.safetensors"
    assert hub.repos["me/trained"]["model.safetensors"] == exported.read_bytes()
    assert "training steps: 2" in pushed_card(hub, "me/trained").text

    def failing_upload(*args, **kwargs):
        raise ConnectionError("the Hub went away")

    monkeypatch.setattr(training_hub, "upload_saved_folder", failing_upload)
    with pytest.raises(RuntimeError, match="saved in .*failed.*the Hub went away"):
        run_script("train_tokenizer", argv + ["--output_dir", str(tmp_path / "failed")])
    assert FlexTokModel.from_pretrained(tmp_path / "failed" / "model").config.num_registers == 8
