"""Read FlexTok checkpoints in the reference implementation's released format and convert them to ours.

The released format (apple/ml-flextok, EPFL-VILAB/flextok_* on the Hub) is a hydra-style config — six nodes
`vae`, `encoder`, `decoder`, `regularizer`, `flow_matching_noise_module`, `pipeline`, each naming a class by
`_target_` — stored either as `config.json` beside `model.safetensors` or as the `__metadata__` of one
`.safetensors` file. No `_target_` is ever imported: the known classes are mapped onto `FlexTokConfig`, anything
else is refused by name.

Usage: `flextok-convert SOURCE OUTPUT_DIR [--vae-config PATH] [--push-to-hub REPO_ID]`
"""

import argparse
import ast
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.utils import logging

from .configuration_flextok import DEFAULT_VAE_CONFIG, FlexTokConfig

logger = logging.get_logger(__name__)

CONFIG_NODES = ("vae", "encoder", "decoder", "regularizer", "flow_matching_noise_module", "pipeline")
_REF = "flextok."
KNOWN_TARGETS = {
    _REF + "vae_wrapper.StableDiffusionVAE",
    _REF + "model.utils.wrappers.SequentialModuleDictWrapper",
    _REF + "model.utils.dict_ops.PerSampleOp",
    _REF + "model.utils.dict_ops.channels_first_to_last",
    _REF + "model.utils.dict_ops.channels_last_to_first",
    _REF + "model.preprocessors.patching.PatchEmbedder",
    _REF + "model.utils.posembs.PositionalEmbeddingAdder",
    _REF + "model.preprocessors.registers.Registers1D",
    _REF + "model.preprocessors.flex_seq_packing.BlockWiseSequencePacker",
    _REF + "model.preprocessors.linear.LinearLayer",
    _REF + "model.preprocessors.token_dropout.MaskedNestedDropout",
    _REF + "model.preprocessors.nullcond.LearnedNullCond",
    _REF + "model.preprocessors.time_embedding.TimestepEmbedder",
    _REF + "model.trunks.transformers.FlexTransformer",
    _REF + "model.postprocessors.seq_unpacking.SequenceUnpacker",
    _REF + "model.postprocessors.heads.LinearHead",
    _REF + "model.postprocessors.heads.ToPatchesLinearHead",
    _REF + "model.postprocessors.heads.MLPHead",
    _REF + "regularizers.quantize_fsq.FSQ",
    _REF + "flow_matching.noise_modules.MinRFNoiseModule",
    _REF + "flow_matching.pipelines.MinRFPipeline",
    "torch.nn.SiLU",
}
# Parts of released configs that only matter for training the reference (e.g. REPA): reported, weights unused.
TRAINING_ONLY_TARGETS = {_REF + "model.postprocessors.heads.MLPHead"}
BLOCK_RENAMES = {
    "attn.wq.": "attn.q_proj.",
    "attn.wk.": "attn.k_proj.",
    "attn.wv.": "attn.v_proj.",
    "attn.proj.": "attn.o_proj.",
    "mlp.fc1.": "mlp.gate_proj.",
    "mlp.fc3.": "mlp.up_proj.",
    "mlp.fc2.": "mlp.down_proj.",
    "adaLN_modulation.1.": "adaln_modulation.",
}


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def check_targets(node, path: str = "config"):
    """Refuses any `_target_` outside the reference's own known classes, naming it and where it is."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and target not in KNOWN_TARGETS:
            raise ValueError(
                f"Refusing to load: unknown _target_ {target!r} at {path}. Only the reference FlexTok classes are "
                "accepted; nothing named in a checkpoint config is ever imported."
            )
        for key, value in node.items():
            check_targets(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{path}[{i}]")


def _unsupported(where: str, what: str):
    raise ValueError(f"Unsupported reference config at {where}: {what}.")


# -------------------------------------------------------------------------------------------- locating files


def _local_files(source: str) -> tuple[dict, Path, Path] | None:
    """(config nodes, weights file, folder) of a local checkpoint in the reference format, else None."""
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if "encoder" not in metadata:
            return None
        # The single-file format stores each node as a Python-literal string.
        return {k: ast.literal_eval(v) for k, v in metadata.items()}, path, path.parent
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            with open(config_file) as f:
                nodes = json.load(f)
            if isinstance(nodes.get("encoder"), dict) and "_target_" in nodes["encoder"]:
                return nodes, path / "model.safetensors", path
            return None
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return _local_files(str(candidates[0]))
    return None


_HUB_KWARGS = ("cache_dir", "revision", "token", "force_download", "local_files_only")


def _hub_files(repo_id: str, **kwargs) -> tuple[dict, Path, Path] | None:
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config_file = hf_hub_download(repo_id, "config.json", **hub_kwargs)
    except Exception:  # not a Hub repo, offline, or no access: let transformers report it
        return None
    with open(config_file) as f:
        nodes = json.load(f)
    if not (isinstance(nodes.get("encoder"), dict) and "_target_" in nodes["encoder"]):
        return None
    weights = Path(hf_hub_download(repo_id, "model.safetensors", **hub_kwargs))
    return nodes, weights, weights.parent


def find_reference_checkpoint(source, **kwargs) -> tuple[dict, Path, Path] | None:
    """(config nodes, weights file, folder) of a local path or Hub repo in the reference's released format, else
    None."""
    source = str(source)
    local = _local_files(source)
    if local is not None or os.path.exists(source):
        return local
    return _hub_files(source, **kwargs)


# ----------------------------------------------------------------------------------------- config mapping


def _resolve_vae_config(vae_node: dict, vae_config, folder: Path) -> dict:
    """The VAE's diffusers config: from the caller, beside the checkpoint, the VAE repo the node names, or the
    reference's built-in SD-style default."""
    if isinstance(vae_config, dict):
        return dict(vae_config)
    candidates = []
    if vae_config is not None:
        vae_config = Path(vae_config)
        candidates = [vae_config / "config.json" if vae_config.is_dir() else vae_config]
        if not candidates[0].is_file():
            raise ValueError(f"vae_config {str(vae_config)!r} is neither a JSON file nor a folder with config.json.")
    else:
        candidates = [folder / "vae_config.json", folder / "vae" / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            with open(candidate) as f:
                return json.load(f)
    if vae_node.get("hf_hub_path"):
        from diffusers import AutoencoderKL

        return dict(AutoencoderKL.load_config(vae_node["hf_hub_path"]))
    config = dict(DEFAULT_VAE_CONFIG)
    config["latent_channels"] = vae_node.get("latent_channels", 16)
    return config


def _square(sizes, where: str) -> int:
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        _unsupported(where, f"only square 2D sizes are supported, got {sizes}")
    return sizes[0]


def _transformer_shape(node: dict, where: str) -> dict:
    for key, default in (("qkv_bias", False), ("proj_bias", False), ("mlp_bias", False), ("gated_mlp", True)):
        if node.get(key, default) != default:
            _unsupported(where, f"{key}={node[key]}")
    return {
        "hidden_size": node.get("dim", 768),
        "num_layers": node.get("depth", 12),
        "head_dim": node.get("head_dim", 64),
        "mlp_ratio": node.get("mlp_ratio", 4.0),
        "qk_norm": node.get("qk_norm", True),
    }


def parse_reference_config(nodes: dict, vae_config=None, folder: Path = Path(".")) -> tuple[FlexTokConfig, dict]:
    """Maps the reference's config nodes onto a `FlexTokConfig`.

    Returns (config, module_names) where module_names maps our roles to the reference's module names, which
    the state dict keys contain.
    """
    missing = [name for name in CONFIG_NODES if name not in nodes]
    if missing:
        raise ValueError(f"Not a FlexTok reference config: missing nodes {missing}.")
    check_targets(nodes)
    vae_node = nodes["vae"]
    vae_config = _resolve_vae_config(vae_node, vae_config, folder)
    if vae_config.get("latent_channels") != vae_node.get("latent_channels", 16):
        raise ValueError(
            f"VAE config has {vae_config.get('latent_channels')} latent channels, the checkpoint expects "
            f"{vae_node.get('latent_channels', 16)}: wrong vae_config."
        )
    names, options, register_steps, shapes = {}, {}, [], {}
    patch_sizes, grid_sizes = [], []

    for part in ("encoder", "decoder"):
        module_dict = nodes[part].get("module_dict", {})
        for name, node in module_dict.items():
            where = f"{part}.module_dict.{name}"
            target = _short(node["_target_"])
            if node["_target_"] in TRAINING_ONLY_TARGETS:
                logger.warning(f"Ignoring training-only module {where} ({target}); its weights are not used.")
            elif target == "PatchEmbedder":
                names[f"{part}_patch_embed"] = name
                patch_sizes.append(_square(node["patch_sizes"], where))
            elif target == "PositionalEmbeddingAdder":
                if node.get("posemb_scaling", "absolute") != "absolute":
                    _unsupported(where, f"posemb_scaling={node['posemb_scaling']}")
                if node.get("posemb_type", "sincos") == "sincos":
                    names[f"{part}_position_table"] = name
                    grid_sizes.append(_square(node["max_sizes"], where))
                elif part == "decoder" and node["posemb_type"] == "learnable_sum" and len(node["max_sizes"]) == 1:
                    names["decoder_register_position"] = name
                    register_steps.append("position_embedding")
                else:
                    _unsupported(where, f"posemb_type={node['posemb_type']} with max_sizes={node['max_sizes']}")
            elif target == "Registers1D":
                if node.get("ordering_mode", "nested") != "nested":
                    _unsupported(where, f"ordering_mode={node['ordering_mode']}")
                names["encoder_registers"] = name
                options["num_registers"] = node.get("n_eval") or node["n_max"]
            elif target == "BlockWiseSequencePacker":
                if len(node["input_list_read_keys"]) != 2:
                    _unsupported(where, "expected two packed subsequences (patches, then registers)")
                options[f"{part}_attention_mask"] = node.get("mask_mode", "full")
                if part == "decoder":
                    options["decoder_adaln_per_subsequence"] = node.get("per_subseq_embs", False)
            elif target == "FlexTransformer":
                names[f"{part}_transformer"] = name
                shapes[part] = _transformer_shape(node, where)
                if part == "decoder":
                    shapes[part]["adaln_expansion"] = node.get("adaLN_expansion", 1)
                    if node.get("adaLN_emb_read_key") is None:
                        _unsupported(where, "the decoder transformer must be adaLN-conditioned on the time step")
                elif node.get("adaLN_emb_read_key") is not None:
                    _unsupported(where, "adaLN conditioning in the encoder")
                if node.get("intermediate_layers"):
                    logger.info(f"{where}: intermediate_layers {node['intermediate_layers']} (training only) ignored.")
            elif target in ("LinearHead", "ToPatchesLinearHead"):
                if node.get("use_mup_readout"):
                    _unsupported(where, "use_mup_readout=True")
                if "norm_layer" in node:
                    _unsupported(where, "a custom norm_layer")
                if target == "LinearHead" and part == "encoder" and node.get("adaLN_emb_read_key") is None:
                    names["encoder_to_latents"] = name
                elif target == "ToPatchesLinearHead" and part == "decoder":
                    if node.get("adaLN_emb_read_key") is None or node.get("adaLN_packing_fn_read_key") is not None:
                        _unsupported(where, "the output head must be adaLN-conditioned per image")
                    names["decoder_output_head"] = name
                    patch_sizes.append(_square(node["patch_sizes"], where))
                else:
                    _unsupported(where, f"{target} in the {part}")
            elif target == "LinearLayer" and part == "decoder":
                names["decoder_register_embed"] = name
            elif target == "MaskedNestedDropout" and part == "decoder":
                names["decoder_mask_token"] = name
                register_steps.append("nested_dropout")
                options["nested_dropout_mode"] = node.get("size_sampling_mode", "uniform")
            elif target == "LearnedNullCond" and part == "decoder":
                if node.get("replace_with_single_token", False):
                    _unsupported(where, "replace_with_single_token=True")
                names["decoder_null_condition"] = name
                register_steps.append("null_condition")
                options["null_condition_prob"] = node.get("dropout_prob", 0.0)
            elif target == "TimestepEmbedder" and part == "decoder":
                names["decoder_time_embedder"] = name
                options["time_embedding_dim"] = node.get("frequency_embedding_size", 256)
                options["max_timestep"] = node.get("max_timestep", 1000.0)
            elif target not in ("PerSampleOp", "SequenceUnpacker"):
                _unsupported(where, f"{target} in the {part}")

    required = (
        "encoder_patch_embed encoder_position_table encoder_registers encoder_transformer encoder_to_latents "
        "decoder_patch_embed decoder_position_table decoder_register_embed decoder_register_position "
        "decoder_mask_token decoder_null_condition decoder_time_embedder decoder_transformer decoder_output_head"
    ).split()
    absent = [role for role in required if role not in names]
    if absent:
        raise ValueError(f"Reference config lacks modules for: {absent}.")
    if len(set(patch_sizes)) != 1 or len(set(grid_sizes)) != 1:
        _unsupported("encoder/decoder", f"patch sizes {patch_sizes} and grid sizes {grid_sizes} must agree")
    expansion = shapes["decoder"].pop("adaln_expansion")
    if expansion != (2 if options["decoder_adaln_per_subsequence"] else 1):
        _unsupported(
            "decoder", f"adaLN_expansion={expansion} with per_subseq_embs={options['decoder_adaln_per_subsequence']}"
        )
    if shapes["encoder"]["qk_norm"] != shapes["decoder"]["qk_norm"]:
        _unsupported("encoder/decoder", "qk_norm must be the same in both transformers")

    noise_node = nodes["flow_matching_noise_module"]
    if not noise_node.get("ln", True) or noise_node.get("stratisfied", False):
        logger.warning(
            "The checkpoint was trained with a non-logit-normal time distribution; training here uses logit-normal."
        )
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
    config = FlexTokConfig(
        vae_config=vae_config,
        vae_scaling_factor=vae_node.get("scaling_factor") or vae_config.get("scaling_factor"),
        vae_sample_posterior=vae_node.get("sample_posterior", True),
        image_size=grid_sizes[0] * patch_sizes[0] * downsample,
        patch_size=patch_sizes[0],
        max_grid_size=grid_sizes[0],
        fsq_levels=nodes["regularizer"]["levels"],
        encoder_hidden_size=shapes["encoder"]["hidden_size"],
        encoder_num_layers=shapes["encoder"]["num_layers"],
        encoder_head_dim=shapes["encoder"]["head_dim"],
        encoder_mlp_ratio=shapes["encoder"]["mlp_ratio"],
        decoder_hidden_size=shapes["decoder"]["hidden_size"],
        decoder_num_layers=shapes["decoder"]["num_layers"],
        decoder_head_dim=shapes["decoder"]["head_dim"],
        decoder_mlp_ratio=shapes["decoder"]["mlp_ratio"],
        decoder_register_steps=register_steps,
        qk_norm=shapes["encoder"]["qk_norm"],
        **options,
    )
    return config, names


# ------------------------------------------------------------------------------------------- weight mapping


def convert_state_dict(reference_state: dict, names: dict, config: FlexTokConfig) -> tuple[dict, list[str]]:
    """Renames (and reshapes) reference weights to ours. Returns (state dict, unused reference keys)."""
    enc, dec = "encoder.module_dict.", "decoder.module_dict."
    prefixes = {
        "vae.vae.": "vae.",
        f"{enc}{names['encoder_patch_embed']}.patch_proj.": "encoder.patch_embed.",
        f"{enc}{names['encoder_position_table']}.posembs": "encoder.position_table",
        f"{enc}{names['encoder_registers']}.registers": "encoder.registers",
        f"{enc}{names['encoder_transformer']}.blocks.": "encoder.blocks.",
        f"{enc}{names['encoder_to_latents']}.proj.": "encoder.to_latents.",
        f"{dec}{names['decoder_register_embed']}.proj.": "decoder.register_embed.",
        f"{dec}{names['decoder_register_position']}.posembs": "decoder.register_position_embeddings",
        f"{dec}{names['decoder_mask_token']}.dropout_mask_token": "decoder.mask_token",
        f"{dec}{names['decoder_null_condition']}.nullcond": "decoder.null_condition",
        f"{dec}{names['decoder_patch_embed']}.patch_proj.": "decoder.patch_embed.",
        f"{dec}{names['decoder_position_table']}.posembs": "decoder.position_table",
        f"{dec}{names['decoder_time_embedder']}.mlp.0.": "decoder.time_embedder.linear_1.",
        f"{dec}{names['decoder_time_embedder']}.mlp.2.": "decoder.time_embedder.linear_2.",
        f"{dec}{names['decoder_transformer']}.blocks.": "decoder.blocks.",
        f"{dec}{names['decoder_output_head']}.adaLN_modulation.1.": "decoder.output_adaln_modulation.",
        f"{dec}{names['decoder_output_head']}.proj.": "decoder.output_proj.",
    }
    state, unused = {}, []
    for key, tensor in reference_state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unused.append(key)
            continue
        new_key = prefixes[prefix] + key[len(prefix) :]
        if ".blocks." in new_key:
            for old, new in BLOCK_RENAMES.items():
                new_key = new_key.replace(old, new)
        if new_key == "decoder.register_position_embeddings":
            # [1, 1, D, K_max] -> [K, D]: only the first K positions are ever used.
            tensor = tensor[0, 0].T[: config.num_registers].contiguous()
        state[new_key] = tensor
    return state, unused


def load_reference_checkpoint(model_class, source, found: tuple[dict, Path, Path], vae_config=None, **kwargs):
    """Builds `model_class` (a `FlexTokModel`) from `found`, what `find_reference_checkpoint(source)` returned.
    Honours `torch_dtype` (or `dtype`) and `device_map` given as one device."""
    nodes, weights_file, folder = found
    config, names = parse_reference_config(nodes, vae_config=vae_config, folder=folder)
    config.name_or_path = str(source)
    try:
        reference_state = load_file(str(weights_file))
    except Exception as error:
        raise ValueError(f"Could not read the weights {weights_file}: {error}") from error

    model = model_class(config)
    state, unused = convert_state_dict(reference_state, names, config)
    expected = model.state_dict()
    if not any(key.startswith("vae.") for key in state) and nodes["vae"].get("hf_hub_path"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(nodes["vae"]["hf_hub_path"])
        state.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ValueError(f"Checkpoint {weights_file} does not match its config: missing weights ({shown}).")
    for key, tensor in state.items():
        if key not in expected:
            unused.append(key)
        elif tensor.shape != expected[key].shape:
            raise ValueError(
                f"Checkpoint {weights_file} does not match its config: {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}."
            )
    if unused:
        logger.warning(f"Unused weights in {weights_file}: {sorted(unused)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected})

    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    device = kwargs.get("device_map")
    if isinstance(device, (str, torch.device, int)) and device != "auto":
        model = model.to(device)
    return model.eval()


def save_pretrained_atomic(model, output_dir, **save_kwargs):
    """`model.save_pretrained` into a temporary folder beside `output_dir`, then swapped into place, so an
    interrupted save never leaves a half-written checkpoint."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, **save_kwargs)
        previous = None
        if output_dir.exists():
            previous = output_dir.with_name(f".{output_dir.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(output_dir, previous)
        os.replace(staging, output_dir)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a released FlexTok checkpoint to the flextok-hf format.")
    parser.add_argument("source", help="reference checkpoint: folder, single .safetensors file, or Hub repo id")
    parser.add_argument("output_dir", help="folder to write (config.json + model.safetensors)")
    parser.add_argument("--vae-config", help="VAE config JSON or folder, instead of the VAE repo the checkpoint names")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the converted model to this repo")
    args = parser.parse_args(argv)

    from .modeling_flextok import FlexTokModel

    model = FlexTokModel.from_pretrained(args.source, vae_config=args.vae_config)
    save_pretrained_atomic(model, args.output_dir)
    print(f"Wrote {args.output_dir}")
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        print(f"Pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
