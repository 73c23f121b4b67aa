"""Loading: by Hub repo id through huggingface_hub's cache (offline), unreadable weights files, the lazy import."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import constants
from reference_format import write_hub_format, write_metadata_format
from safetensors.torch import load_file, save_file
from test_parity import REFERENCE_DIR, VECTOR_SETS
from tiny_models import random_ar_model, random_flextok_model, random_images

from flextok_hf import FlexTokConfig, FlexTokModel
from flextok_hf.loading_reference import parse_reference_config

MODEL_REPO = "EPFL-VILAB/flextok_d18_d28_dfn"
VAE_REPO = "EPFL-VILAB/flextok_vae_c16"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict) -> Path:
    """Lays out `files` ({name: source path or dict of tensors or JSON-able dict}) as huggingface_hub's cache
    holds a downloaded model repo: `models--OWNER--NAME/snapshots/<rev>/<name>` with `refs/main` naming `<rev>`.
    Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snapshot / name)
        elif name.endswith(".safetensors"):
            save_file(content, str(snapshot / name))
        else:
            (snapshot / name).write_text(json.dumps(content))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that every library resolves repo ids from, offline. huggingface_hub reads both settings
    from the environment once, at import, so its constants are patched too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("vae_weights", ["in_checkpoint", "in_vae_repo"])
@pytest.mark.parametrize("vector_set", VECTOR_SETS or [None], ids=lambda p: p.name if p else "none")
def test_released_checkpoint_loads_by_repo_id(hub_cache, vector_set, vae_weights):
    """The released layout: the model repo names its VAE repo (`hf_hub_path`), a diffusers AutoencoderKL folder."""
    if vector_set is None:
        pytest.skip(f"no reference vector sets found in {REFERENCE_DIR} (set FLEXTOK_HF_REFERENCE)")
    nodes = json.loads((vector_set / "checkpoint" / "config.json").read_text())
    nodes["vae"]["hf_hub_path"] = VAE_REPO
    state = load_file(str(vector_set / "checkpoint" / "model.safetensors"))
    vae_state = {key.removeprefix("vae.vae."): value for key, value in state.items() if key.startswith("vae.vae.")}
    if vae_weights == "in_vae_repo":
        state = {key: value for key, value in state.items() if not key.startswith("vae.")}
    put_in_hub_cache(hub_cache, MODEL_REPO, {"config.json": nodes, "model.safetensors": state})
    put_in_hub_cache(
        hub_cache,
        VAE_REPO,
        {"config.json": vector_set / "vae_config.json", "diffusion_pytorch_model.safetensors": vae_state},
    )

    model = FlexTokModel.from_pretrained(MODEL_REPO)

    vectors = load_file(str(vector_set / "vectors.safetensors"))
    assert model.config.name_or_path == MODEL_REPO
    assert torch.equal(model.encode(vectors["images"]), vectors["tokens"])


def test_our_format_by_repo_id_reads_its_config_once(hub_cache, tmp_path, monkeypatch):
    model = random_flextok_model()
    model.save_pretrained(tmp_path / "saved")
    files = {name: tmp_path / "saved" / name for name in ("config.json", "model.safetensors")}
    put_in_hub_cache(hub_cache, "someone/flextok-tiny", files)
    resolved = []
    download = transformers_hub.hf_hub_download

    def counting_download(repo_id, filename, **kwargs):
        resolved.append(filename)
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(transformers_hub, "hf_hub_download", counting_download)
    loaded = FlexTokModel.from_pretrained("someone/flextok-tiny")
    assert resolved.count("config.json") == 1
    images = random_images(2)
    assert torch.equal(loaded.encode(images), model.encode(images))


def _corrupt(file: Path, how: str):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else bytes(range(256)) * 8)


@pytest.mark.parametrize("how", ["truncated", "random_bytes"])
@pytest.mark.parametrize("layout", ["ours", "reference_folder", "reference_single_file"])
def test_unreadable_weights_are_named(tmp_path, layout, how):
    model = random_flextok_model()
    if layout == "ours":
        model.save_pretrained(tmp_path)
        source, weights = tmp_path, tmp_path / "model.safetensors"
    elif layout == "reference_folder":
        write_hub_format(model, tmp_path)
        source, weights = tmp_path, tmp_path / "model.safetensors"
    else:
        source = weights = tmp_path / "flextok.safetensors"
        write_metadata_format(model, weights)
    _corrupt(weights, how)
    with pytest.raises(ValueError, match=rf"{weights.name} is corrupt or truncated"):
        FlexTokModel.from_pretrained(source)


def test_benchmark_config_is_the_released_d18_d28_size():
    """The benchmark builds ours and the reference from this one released-format config."""
    config_file = Path(__file__).resolve().parents[1] / "benchmarks" / "flextok_d18_d28_reference_config.json"
    config, _ = parse_reference_config(json.loads(config_file.read_text()))
    assert config.to_diff_dict() == FlexTokConfig().to_diff_dict()


@pytest.mark.parametrize("first", ["flextok_hf", "transformers"])
def test_import_is_lazy_and_auto_model_knows_flextok(tmp_path, first):
    """`import flextok_hf` loads neither torch nor a model; `AutoModel` still finds both FlexTok models, whichever
    of the two packages is imported first. A fresh interpreter, as this one has imported everything already."""
    random_flextok_model().save_pretrained(tmp_path / "tokenizer")
    random_ar_model().save_pretrained(tmp_path / "generator")
    imports = {
        "flextok_hf": "import flextok_hf\nassert 'torch' not in sys.modules\nfrom transformers import AutoModel",
        "transformers": "from transformers import AutoModel\nimport flextok_hf",
    }[first]
    script = f"""import sys
{imports}
for folder in ("tokenizer", "generator"):
    print(type(AutoModel.from_pretrained({str(tmp_path)!r} + "/" + folder)).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FlexTokModel", "FlexTokARModel"]


@pytest.mark.parametrize("module", ["flextok_hf.sampling", "flextok_hf.training.vae", "flextok_hf.training.data"])
def test_no_import_cycle_through_peft(tmp_path, module):
    """With peft installed (the dev extras install it, as many users have it), diffusers imports peft, which imports
    transformers' Auto classes, which would import our modeling modules in the middle of diffusers' own import.
    Importing any module first must work; FlexTok then joins the Auto classes at the next import of a new module."""
    random_flextok_model().save_pretrained(tmp_path / "tokenizer")
    script = f"""import importlib
importlib.import_module({module!r})
import peft
import flextok_hf.utils
from transformers import AutoModel
print(type(AutoModel.from_pretrained({str(tmp_path / "tokenizer")!r})).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FlexTokModel"]


def test_deferred_registration_runs_no_module_twice():
    """The case that defers registration (diffusers imported first, peft in it importing the Auto classes) must not
    run a module twice: a diffusers scheduler the user imports is the class FlexTok checks against."""
    script = """import sys
from diffusers import FlowMatchEulerDiscreteScheduler
from flextok_hf import FlexTokModel
from diffusers import FlowMatchHeunDiscreteScheduler
import flextok_hf.sampling
print(flextok_hf.sampling.FlowMatchHeunDiscreteScheduler is FlowMatchHeunDiscreteScheduler)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]
