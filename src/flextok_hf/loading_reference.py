"""Load FlexTok checkpoints in the reference implementation's released format.

The released format (apple/ml-flextok, EPFL-VILAB/flextok_* on the Hub) is a hydra-style config — six nodes
`vae`, `encoder`, `decoder`, `regularizer`, `flow_matching_noise_module`, `pipeline`, each naming a class by
`_target_` — stored either as `config.json` beside `model.safetensors` or as the `__metadata__` of one
`.safetensors` file. No `_target_` is ever imported: each known class has a handler that maps its node onto
`FlexTokConfig`; anything else is refused by name.
"""

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers.utils import cached_file, logging

from .configuration_flextok import DEFAULT_VAE_CONFIG, FlexTokConfig

logger = logging.get_logger(__name__)

CONFIG_NODES = ("vae", "encoder", "decoder", "regularizer", "flow_matching_noise_module", "pipeline")
_REF = "flextok."
# `from_pretrained` arguments that say where and how to fetch files; the VAE repo takes all but the model's own
# revision and subfolder.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
VAE_HUB_KWARGS = HUB_KWARGS[:-2]
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


def _unsupported(where: str, what: str):
    raise ValueError(f"Unsupported reference config at {where}: {what}.")


def check_safetensors(file) -> None:
    """Raises a ValueError naming `file` if its safetensors header cannot be read: a truncated download or a file
    that is not safetensors at all (safetensors' own error does not say which file)."""
    try:
        with safe_open(str(file), "pt"):
            pass
    except SafetensorError as error:
        raise ValueError(
            f"{file} is corrupt or truncated: not a readable safetensors file ({error}). Download or save it again."
        ) from error


# -------------------------------------------------------------------------------------------- locating files


@dataclass
class Checkpoint:
    """What `find_checkpoint` found: the resolved `config.json` (None for a single `.safetensors` file) and, for
    the released format, its config nodes (in file order) and weights file."""

    source: str
    config_file: str | None
    nodes: dict | None = None
    weights_file: Path | None = None

    @property
    def is_reference_format(self) -> bool:
        return self.nodes is not None

    def check_weights(self):
        """Raises a ValueError naming the first unreadable `.safetensors` file beside the config, if any."""
        if self.config_file is not None:
            for file in sorted(Path(self.config_file).parent.glob("*.safetensors")):
                check_safetensors(file)


def is_reference_config(config: dict) -> bool:
    """Whether a `config.json` holds the reference's hydra-style nodes rather than a transformers config."""
    return isinstance(config.get("encoder"), dict) and "_target_" in config["encoder"]


def _single_file_checkpoint(source: str, file: Path) -> Checkpoint:
    check_safetensors(file)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata() or {}
    if "encoder" not in metadata:
        raise ValueError(
            f"{file} holds no FlexTok config in its metadata; load the folder with its config.json instead."
        )
    # The single-file format stores each node as a Python-literal string.
    nodes = {key: ast.literal_eval(value) for key, value in metadata.items()}
    return Checkpoint(source, None, nodes, file)


def find_checkpoint(source, **kwargs) -> Checkpoint:
    """Locates the checkpoint at `source` (a folder, a single `.safetensors` file or a Hub repo id) in either
    format, reading its config once. `kwargs` are `from_pretrained`'s; the Hub ones (`cache_dir`, `revision`,
    `token`, `local_files_only`, ...) are honoured, and a repo id resolves through the Hub cache as transformers
    would (offline too)."""
    source, path = str(source), Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        return _single_file_checkpoint(source, path)
    hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    if path.is_dir() and not (path / hub_kwargs.get("subfolder", "") / "config.json").is_file():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return _single_file_checkpoint(source, candidates[0])
        return Checkpoint(source, None)  # transformers reports what is missing
    config_file = cached_file(source, "config.json", **hub_kwargs)
    with open(config_file) as f:
        config = json.load(f)
    if not is_reference_config(config):
        return Checkpoint(source, config_file)
    weights_file = Path(cached_file(source, "model.safetensors", **hub_kwargs))
    return Checkpoint(source, config_file, config, weights_file)


# ----------------------------------------------------------------------------------------- config mapping


def _resolve_vae_config(vae_node: dict, vae_config, folder: Path, hub_kwargs: dict) -> dict:
    """The VAE's diffusers config: from the caller, beside the checkpoint, the VAE repo the node names, or the
    reference's built-in SD-style default."""
    if isinstance(vae_config, dict):
        return dict(vae_config)
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

        return dict(AutoencoderKL.load_config(vae_node["hf_hub_path"], **hub_kwargs))
    return dict(DEFAULT_VAE_CONFIG, latent_channels=vae_node.get("latent_channels", 16))


def _square(sizes, where: str) -> int:
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        _unsupported(where, f"only square 2D sizes are supported, got {sizes}")
    return sizes[0]


@dataclass
class _Modules:
    """What the encoder's and decoder's module nodes say, gathered node by node in file order."""

    names: dict = field(default_factory=dict)  # our role -> the reference's module name (part of its weight keys)
    options: dict = field(default_factory=dict)  # FlexTokConfig arguments
    shapes: dict = field(default_factory=dict)  # "encoder" / "decoder" -> transformer shape
    register_steps: list = field(default_factory=list)
    patch_sizes: list = field(default_factory=list)
    grid_sizes: list = field(default_factory=list)
    intermediate_layers: dict = field(default_factory=dict)  # decoder feature key -> block indices it holds
    repa_heads: list = field(default_factory=list)  # (name, node, where) of MLPHeads, checked once all are read


# One handler per `_target_` of the encoder's and decoder's module dicts: handler(modules, part, name, node, where).


def _patch_embedder(modules, part, name, node, where):
    modules.names[f"{part}_patch_embed"] = name
    modules.patch_sizes.append(_square(node["patch_sizes"], where))


def _positional_embedding(modules, part, name, node, where):
    if node.get("posemb_scaling", "absolute") != "absolute":
        _unsupported(where, f"posemb_scaling={node['posemb_scaling']}")
    kind = node.get("posemb_type", "sincos")
    if kind == "sincos":
        modules.names[f"{part}_position_table"] = name
        modules.grid_sizes.append(_square(node["max_sizes"], where))
    elif part == "decoder" and kind == "learnable_sum" and len(node["max_sizes"]) == 1:
        modules.names["decoder_register_position"] = name
        modules.register_steps.append("position_embedding")
    else:
        _unsupported(where, f"posemb_type={kind} with max_sizes={node['max_sizes']}")


def _registers(modules, part, name, node, where):
    if part != "encoder" or node.get("ordering_mode", "nested") != "nested":
        _unsupported(where, f"Registers1D in the {part} with ordering_mode={node.get('ordering_mode', 'nested')}")
    modules.names["encoder_registers"] = name
    modules.options["num_registers"] = node.get("n_eval") or node["n_max"]


def _sequence_packer(modules, part, name, node, where):
    if len(node["input_list_read_keys"]) != 2:
        _unsupported(where, "expected two packed subsequences (patches, then registers)")
    modules.options[f"{part}_attention_mask"] = node.get("mask_mode", "full")
    if part == "decoder":
        modules.options["decoder_adaln_per_subsequence"] = node.get("per_subseq_embs", False)


def _transformer(modules, part, name, node, where):
    for key, default in (("qkv_bias", False), ("proj_bias", False), ("mlp_bias", False), ("gated_mlp", True)):
        if node.get(key, default) != default:
            _unsupported(where, f"{key}={node[key]}")
    conditioned = node.get("adaLN_emb_read_key") is not None
    if conditioned != (part == "decoder"):
        _unsupported(where, "only the decoder transformer is adaLN-conditioned (on the time step)")
    modules.names[f"{part}_transformer"] = name
    modules.shapes[part] = {
        "hidden_size": node.get("dim", 768),
        "num_layers": node.get("depth", 12),
        "head_dim": node.get("head_dim", 64),
        "mlp_ratio": node.get("mlp_ratio", 4.0),
        "qk_norm": node.get("qk_norm", True),
        "adaln_expansion": node.get("adaLN_expansion", 1),
    }
    if part == "decoder" and node.get("intermediate_layer_write_key"):
        modules.intermediate_layers[node["intermediate_layer_write_key"]] = list(node.get("intermediate_layers", []))


def _check_head(node, where):
    if node.get("use_mup_readout"):
        _unsupported(where, "use_mup_readout=True")
    if "norm_layer" in node:
        _unsupported(where, "a custom norm_layer")


def _to_latents_head(modules, part, name, node, where):
    _check_head(node, where)
    if part != "encoder" or node.get("adaLN_emb_read_key") is not None:
        _unsupported(where, f"LinearHead in the {part}")
    modules.names["encoder_to_latents"] = name


def _to_patches_head(modules, part, name, node, where):
    _check_head(node, where)
    if part != "decoder":
        _unsupported(where, "ToPatchesLinearHead in the encoder")
    if node.get("adaLN_emb_read_key") is None or node.get("adaLN_packing_fn_read_key") is not None:
        _unsupported(where, "the output head must be adaLN-conditioned per image")
    modules.names["decoder_output_head"] = name
    modules.patch_sizes.append(_square(node["patch_sizes"], where))


def _require_decoder(part, node, where):
    if part != "decoder":
        _unsupported(where, f"{_short(node['_target_'])} in the {part}")


def _register_embedding(modules, part, name, node, where):
    _require_decoder(part, node, where)
    modules.names["decoder_register_embed"] = name


def _nested_dropout(modules, part, name, node, where):
    _require_decoder(part, node, where)
    modules.names["decoder_mask_token"] = name
    modules.register_steps.append("nested_dropout")
    modules.options["nested_dropout_mode"] = node.get("size_sampling_mode", "uniform")


def _null_condition(modules, part, name, node, where):
    _require_decoder(part, node, where)
    if node.get("replace_with_single_token", False):
        _unsupported(where, "replace_with_single_token=True")
    modules.names["decoder_null_condition"] = name
    modules.register_steps.append("null_condition")
    modules.options["null_condition_prob"] = node.get("dropout_prob", 0.0)


def _time_embedder(modules, part, name, node, where):
    _require_decoder(part, node, where)
    modules.names["decoder_time_embedder"] = name
    modules.options["time_embedding_dim"] = node.get("frequency_embedding_size", 256)
    modules.options["max_timestep"] = node.get("max_timestep", 1000.0)


def _mlp_head(modules, part, name, node, where):
    modules.repa_heads.append((name, node, where))


def _repa_projector_options(modules) -> dict:
    """FlexTokConfig arguments that keep a released REPA head (an MLPHead on one decoder block's features), or
    none (with a warning naming why) for an MLPHead our `FlexTokREPAProjector` cannot express."""
    options = {}
    for name, node, where in modules.repa_heads:
        layers = modules.intermediate_layers.get(node.get("read_key"))
        decoder_width = modules.shapes.get("decoder", {}).get("hidden_size")
        reasons = [
            reason
            for reason, applies in (
                ("it does not read exactly one decoder block's features", layers is None or len(layers) != 1),
                ("its input width is not the decoder's", node.get("dim") != decoder_width),
                ("use_mup_readout=True", node.get("use_mup_readout", False)),
                ("bias=False", not node.get("bias", True)),
                (
                    "a custom act_layer or norm_layer",
                    "act_layer" in node or node.get("norm_layer", "default") not in ("default", None),
                ),
                ("a second REPA head", bool(options)),
            )
            if applies
        ]
        if reasons:
            logger.warning(f"Ignoring training-only module {where} (MLPHead): {'; '.join(reasons)}.")
            continue
        modules.names["repa_projector"] = name
        options = {
            "repa_layer": layers[0],
            "repa_feature_size": node["dim_out"],
            "repa_projector_hidden_size": int(node.get("dim_hidden_ratio", 4.0) * node["dim"]),  # as MLPHead sizes it
            "repa_projector_num_layers": node["num_layers"],
            "repa_projector_input_norm": "norm_layer" not in node,  # absent: the default affine-free LayerNorm
        }
    return options


def _no_weights(modules, part, name, node, where):
    pass  # reshaping and unpacking steps: our modules do them inline


MODULE_HANDLERS = {
    _REF + "model.preprocessors.patching.PatchEmbedder": _patch_embedder,
    _REF + "model.utils.posembs.PositionalEmbeddingAdder": _positional_embedding,
    _REF + "model.preprocessors.registers.Registers1D": _registers,
    _REF + "model.preprocessors.flex_seq_packing.BlockWiseSequencePacker": _sequence_packer,
    _REF + "model.trunks.transformers.FlexTransformer": _transformer,
    _REF + "model.postprocessors.heads.LinearHead": _to_latents_head,
    _REF + "model.postprocessors.heads.ToPatchesLinearHead": _to_patches_head,
    _REF + "model.preprocessors.linear.LinearLayer": _register_embedding,
    _REF + "model.preprocessors.token_dropout.MaskedNestedDropout": _nested_dropout,
    _REF + "model.preprocessors.nullcond.LearnedNullCond": _null_condition,
    _REF + "model.preprocessors.time_embedding.TimestepEmbedder": _time_embedder,
    _REF + "model.postprocessors.heads.MLPHead": _mlp_head,
    _REF + "model.utils.dict_ops.PerSampleOp": _no_weights,
    _REF + "model.postprocessors.seq_unpacking.SequenceUnpacker": _no_weights,
}
# Targets allowed elsewhere in the config: the top-level nodes and the functions PerSampleOp applies.
KNOWN_TARGETS = set(MODULE_HANDLERS) | {
    _REF + "vae_wrapper.StableDiffusionVAE",
    _REF + "model.utils.wrappers.SequentialModuleDictWrapper",
    _REF + "model.utils.dict_ops.channels_first_to_last",
    _REF + "model.utils.dict_ops.channels_last_to_first",
    _REF + "regularizers.quantize_fsq.FSQ",
    _REF + "flow_matching.noise_modules.MinRFNoiseModule",
    _REF + "flow_matching.pipelines.MinRFPipeline",
    "torch.nn.SiLU",
}
REQUIRED_ROLES = (
    "encoder_patch_embed encoder_position_table encoder_registers encoder_transformer encoder_to_latents "
    "decoder_patch_embed decoder_position_table decoder_register_embed decoder_register_position "
    "decoder_mask_token decoder_null_condition decoder_time_embedder decoder_transformer decoder_output_head"
).split()


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


def parse_reference_config(
    nodes: dict, vae_config=None, folder: Path = Path("."), **hub_kwargs
) -> tuple[FlexTokConfig, dict]:
    """Maps the reference's config nodes onto a `FlexTokConfig`.

    Returns (config, module_names) where module_names maps our roles to the reference's module names, which
    the state dict keys contain. `hub_kwargs` are used to fetch the config of the VAE repo the nodes name.
    """
    missing = [name for name in CONFIG_NODES if name not in nodes]
    if missing:
        raise ValueError(f"Not a FlexTok reference config: missing nodes {missing}.")
    check_targets(nodes)
    vae_node = nodes["vae"]
    vae_config = _resolve_vae_config(vae_node, vae_config, folder, hub_kwargs)
    if vae_config.get("latent_channels") != vae_node.get("latent_channels", 16):
        raise ValueError(
            f"VAE config has {vae_config.get('latent_channels')} latent channels, the checkpoint expects "
            f"{vae_node.get('latent_channels', 16)}: wrong vae_config."
        )

    modules = _Modules()
    for part in ("encoder", "decoder"):
        for name, node in nodes[part].get("module_dict", {}).items():
            where = f"{part}.module_dict.{name}"
            handler = MODULE_HANDLERS.get(node.get("_target_"))
            if handler is None:
                _unsupported(where, f"{node.get('_target_')} is not a module of the {part}")
            handler(modules, part, name, node, where)

    absent = [role for role in REQUIRED_ROLES if role not in modules.names]
    if absent:
        raise ValueError(f"Reference config lacks modules for: {absent}.")
    if len(set(modules.patch_sizes)) != 1 or len(set(modules.grid_sizes)) != 1:
        _unsupported(
            "encoder/decoder", f"patch sizes {modules.patch_sizes} and grid sizes {modules.grid_sizes} must agree"
        )
    encoder, decoder = modules.shapes["encoder"], modules.shapes["decoder"]
    per_subsequence = modules.options["decoder_adaln_per_subsequence"]
    if decoder["adaln_expansion"] != (2 if per_subsequence else 1):
        _unsupported("decoder", f"adaLN_expansion={decoder['adaln_expansion']} with per_subseq_embs={per_subsequence}")
    if encoder["qk_norm"] != decoder["qk_norm"]:
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
        image_size=modules.grid_sizes[0] * modules.patch_sizes[0] * downsample,
        patch_size=modules.patch_sizes[0],
        max_grid_size=modules.grid_sizes[0],
        fsq_levels=list(nodes["regularizer"]["levels"]),
        **{f"encoder_{key}": encoder[key] for key in ("hidden_size", "num_layers", "head_dim", "mlp_ratio")},
        **{f"decoder_{key}": decoder[key] for key in ("hidden_size", "num_layers", "head_dim", "mlp_ratio")},
        decoder_register_steps=modules.register_steps,
        qk_norm=encoder["qk_norm"],
        **modules.options,
        **_repa_projector_options(modules),
    )
    return config, modules.names


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
    if "repa_projector" in names:  # laid out as the reference's MLPHead
        prefixes[f"{dec}{names['repa_projector']}."] = "repa_projector."
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


def load_reference_checkpoint(model_class, checkpoint: Checkpoint, vae_config=None, **kwargs):
    """Builds `model_class` (a `FlexTokModel`) from a released-format `checkpoint` found by `find_checkpoint`.
    Honours the Hub arguments of `from_pretrained` (also for the VAE repo the config names), `torch_dtype` (or
    `dtype`) and `device_map` given as one device. Returns the model and its loading info (transformers' keys;
    `unexpected_keys` are the checkpoint's weights the model has no place for)."""
    nodes, weights_file = checkpoint.nodes, checkpoint.weights_file
    vae_hub_kwargs = {key: kwargs[key] for key in VAE_HUB_KWARGS if key in kwargs}
    config, names = parse_reference_config(nodes, vae_config, weights_file.parent, **vae_hub_kwargs)
    config.name_or_path = checkpoint.source
    check_safetensors(weights_file)
    reference_state = load_file(str(weights_file))

    model = model_class(config)
    state, unused = convert_state_dict(reference_state, names, config)
    expected = model.state_dict()
    if not any(key.startswith("vae.") for key in state) and nodes["vae"].get("hf_hub_path"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(nodes["vae"]["hf_hub_path"], **vae_hub_kwargs)
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
    loading_info = {"missing_keys": set(), "unexpected_keys": set(unused), "mismatched_keys": set(), "error_msgs": []}
    model.load_state_dict({k: v for k, v in state.items() if k in expected})

    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    device = kwargs.get("device_map")
    if isinstance(device, (str, torch.device, int)) and device != "auto":
        model = model.to(device)
    return model.eval(), loading_info
