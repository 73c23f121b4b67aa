"""Writes small checkpoints in the reference implementation's released format (hydra-style config nodes and the
reference's state-dict key names), so loading that format is tested without the network. Written from the
format's description (shared/reference/SPEC.md section 1), independently of the library's loader."""

import json
from pathlib import Path

from safetensors.torch import save_file

from flextok_hf import FlexTokConfig, FlexTokModel

REF = "flextok."


def _node(target: str, **kwargs) -> dict:
    return {"_target_": REF + target, **kwargs}


def _per_sample(read_key: str, write_key: str, op: str) -> dict:
    fn = {"_target_": REF + f"model.utils.dict_ops.{op}", "_partial_": True}
    return _node("model.utils.dict_ops.PerSampleOp", read_key=read_key, write_key=write_key, per_sample_op=fn)


def _patch_embedder(part: str, channels: int, dim: int, patch: list[int]) -> dict:
    return _node(
        "model.preprocessors.patching.PatchEmbedder",
        input_tensor_list_read_key=f"{part}_bhwc",
        patches_list_write_key=f"{part}_patches",
        n_patches_write_key=f"{part}_n",
        channels_in=channels,
        dim=dim,
        patch_sizes=patch,
        flatten_patches=False,
    )


def _sincos_positions(part: str, dim: int, grid: list[int]) -> dict:
    return _node(
        "model.utils.posembs.PositionalEmbeddingAdder",
        read_key=f"{part}_patches",
        write_key=f"{part}_patches",
        dim=dim,
        max_sizes=grid,
        posemb_type="sincos",
        posemb_scaling="absolute",
    )


def _packer(part: str, registers_key: str, mask_mode: str, **options) -> dict:
    return _node(
        "model.preprocessors.flex_seq_packing.BlockWiseSequencePacker",
        input_list_read_keys=[f"{part}_patches", registers_key],
        packed_seq_write_key=f"{part}_seq",
        block_mask_write_key=f"{part}_mask",
        inner_packed_shapes_write_key=f"{part}_ps_inner",
        outer_packed_shapes_write_key=f"{part}_ps_outer",
        mask_mode=mask_mode,
        pad_to_multiple=128,
        **options,
    )


def _transformer(part: str, dim: int, depth: int, head_dim: int, **options) -> dict:
    return _node(
        "model.trunks.transformers.FlexTransformer",
        input_seq_read_key=f"{part}_seq",
        output_seq_write_key=f"{part}_seq",
        dim=dim,
        depth=depth,
        head_dim=head_dim,
        block_mask_read_key=f"{part}_mask",
        **options,
    )


def _unpacker(part: str, registers_key: str) -> dict:
    return _node(
        "model.postprocessors.seq_unpacking.SequenceUnpacker",
        packed_seq_read_key=f"{part}_seq",
        inner_seq_write_keys=[f"{part}_patches", registers_key],
        inner_packed_shapes_read_key=f"{part}_ps_inner",
        outer_packed_shapes_read_key=f"{part}_ps_outer",
    )


def _repa_head(config: FlexTokConfig) -> dict:
    # The reference's MLPHead: [norm,] Linear, SiLU, ..., out_proj; its norm is on unless norm_layer says null.
    head = _node(
        "model.postprocessors.heads.MLPHead",
        read_key="dec_repa",
        write_key="dec_repa_pred",
        dim=config.decoder_hidden_size,
        dim_out=config.repa_feature_size,
        num_layers=config.repa_projector_num_layers,
        use_mup_readout=False,
        dim_hidden_ratio=config.repa_projector_hidden_size / config.decoder_hidden_size,
    )
    return head if config.repa_projector_input_norm else {**head, "norm_layer": None}


def reference_config_nodes(config: FlexTokConfig) -> dict:
    """The six config nodes of a released checkpoint, in the reference's module order."""
    enc, dec, channels = config.encoder_hidden_size, config.decoder_hidden_size, config.latent_channels
    patch, grid = [config.patch_size] * 2, [config.max_grid_size] * 2
    per_subseq = config.decoder_adaln_per_subsequence
    encoder = {
        "enc_channels_to_last": _per_sample("vae_latents", "enc_bhwc", "channels_first_to_last"),
        "enc_patch_emb": _patch_embedder("enc", channels, enc, patch),
        "enc_posemb_module": _sincos_positions("enc", enc, grid),
        "enc_register_module": _node(
            "model.preprocessors.registers.Registers1D",
            input_tensor_list_read_key="enc_patches",
            register_sizes_read_write_key="register_sizes",
            registers_write_key="enc_registers",
            dim=enc,
            n_min=config.num_registers,
            n_max=config.num_registers,
        ),
        "enc_seq_packer": _packer("enc", "enc_registers", config.encoder_attention_mask),
        "enc_transformer": _transformer("enc", enc, config.encoder_num_layers, config.encoder_head_dim),
        "enc_unpacker": _unpacker("enc", "enc_registers"),
        "enc_to_latents": _node(
            "model.postprocessors.heads.LinearHead",
            read_key="enc_registers",
            write_key="enc_registers",
            dim=enc,
            dim_out=len(config.fsq_levels),
            use_mup_readout=False,
            weight_init_style="zero",
        ),
    }
    register_steps = {
        "position_embedding": (
            "dec_registers_posemb_module",
            _node(
                "model.utils.posembs.PositionalEmbeddingAdder",
                read_key="dec_quants",
                write_key="dec_quants",
                dim=dec,
                max_sizes=[config.num_registers],
                posemb_type="learnable_sum",
                posemb_scaling="absolute",
            ),
        ),
        "nested_dropout": (
            "dec_nested_dropout",
            _node(
                "model.preprocessors.token_dropout.MaskedNestedDropout",
                read_write_key="dec_quants",
                dim=dec,
                size_sampling_mode=config.nested_dropout_mode,
            ),
        ),
        "null_condition": (
            "dec_latent_dropout",
            _node(
                "model.preprocessors.nullcond.LearnedNullCond",
                read_write_key="dec_quants",
                dim=dec,
                dropout_prob=config.null_condition_prob,
                eval_drop_flag_read_key="eval_dropout_mask",
            ),
        ),
    }
    decoder = {
        "dec_from_latents": _node(
            "model.preprocessors.linear.LinearLayer",
            read_key="quants",
            write_key="dec_quants",
            dim_in=len(config.fsq_levels),
            dim=dec,
        ),
        **dict(register_steps[step] for step in config.decoder_register_steps),
        "dec_noise_channels_to_last": _per_sample("vae_latents_noised", "dec_bhwc", "channels_first_to_last"),
        "dec_noise_patch_emb": _patch_embedder("dec", channels, dec, patch),
        "dec_patches_posemb_module": _sincos_positions("dec", dec, grid),
        "dec_seq_packer": _packer(
            "dec",
            "dec_quants",
            config.decoder_attention_mask,
            emb_packing_fn_write_key="dec_emb_packing_fn",
            per_subseq_embs=per_subseq,
        ),
        "dec_time_embedder": _node(
            "model.preprocessors.time_embedding.TimestepEmbedder",
            timesteps_read_key="timesteps",
            time_embedding_write_key="dec_temb",
            dim=dec,
            max_timestep=config.max_timestep,
        ),
        "dec_transformer": _transformer(
            "dec",
            dec,
            config.decoder_num_layers,
            config.decoder_head_dim,
            adaLN_emb_read_key="dec_temb",
            adaLN_packing_fn_read_key="dec_emb_packing_fn",
            adaLN_expansion=2 if per_subseq else 1,
            intermediate_layer_write_key="dec_repa",
            intermediate_layers=[0 if config.repa_layer is None else config.repa_layer],
        ),
        "dec_unpacker": _unpacker("dec", "dec_quants"),
        "dec_to_patches": _node(
            "model.postprocessors.heads.ToPatchesLinearHead",
            read_key="dec_patches",
            write_key="vae_latents_reconst",
            dim=dec,
            channels_out=channels,
            patch_sizes=patch,
            use_mup_readout=False,
            adaLN_emb_read_key="dec_temb",
        ),
        "dec_channels_to_first": _per_sample("vae_latents_reconst", "vae_latents_reconst", "channels_last_to_first"),
    }
    if config.repa_layer is not None:
        decoder["dec_repa_head"] = _repa_head(config)
    return {
        "vae": _node(
            "vae_wrapper.StableDiffusionVAE",
            images_read_key="rgb",
            vae_latents_read_key="vae_latents_reconst",
            vae_latents_write_key="vae_latents",
            images_reconst_write_key="rgb_reconst",
            latent_channels=channels,
            scaling_factor=config.vae_scaling_factor,
            hf_hub_path=None,
            sample_posterior=False,
            frozen=True,
        ),
        "encoder": _node("model.utils.wrappers.SequentialModuleDictWrapper", module_dict=encoder),
        "decoder": _node("model.utils.wrappers.SequentialModuleDictWrapper", module_dict=decoder),
        "regularizer": _node(
            "regularizers.quantize_fsq.FSQ",
            latents_read_key="enc_registers",
            quants_write_key="quants",
            tokens_write_key="tokens",
            levels=list(config.fsq_levels),
        ),
        "flow_matching_noise_module": _node(
            "flow_matching.noise_modules.MinRFNoiseModule",
            clean_images_read_key="vae_latents",
            noised_images_write_key="vae_latents_noised",
            timesteps_write_key="timesteps",
            sigmas_write_key="sigmas",
            ln=True,
        ),
        "pipeline": _node(
            "flow_matching.pipelines.MinRFPipeline",
            _partial_=True,
            latents_read_key="quants",
            timesteps_read_key="timesteps",
            noised_images_read_key="vae_latents_noised",
            reconst_write_key="vae_latents_reconst",
            out_channels=channels,
        ),
    }


_PREFIXES = {
    "vae.": "vae.vae.",
    "encoder.patch_embed.": "encoder.module_dict.enc_patch_emb.patch_proj.",
    "encoder.position_table": "encoder.module_dict.enc_posemb_module.posembs",
    "encoder.registers": "encoder.module_dict.enc_register_module.registers",
    "encoder.blocks.": "encoder.module_dict.enc_transformer.blocks.",
    "encoder.to_latents.": "encoder.module_dict.enc_to_latents.proj.",
    "decoder.register_embed.": "decoder.module_dict.dec_from_latents.proj.",
    "decoder.mask_token": "decoder.module_dict.dec_nested_dropout.dropout_mask_token",
    "decoder.null_condition": "decoder.module_dict.dec_latent_dropout.nullcond",
    "decoder.patch_embed.": "decoder.module_dict.dec_noise_patch_emb.patch_proj.",
    "decoder.position_table": "decoder.module_dict.dec_patches_posemb_module.posembs",
    "decoder.time_embedder.linear_1.": "decoder.module_dict.dec_time_embedder.mlp.0.",
    "decoder.time_embedder.linear_2.": "decoder.module_dict.dec_time_embedder.mlp.2.",
    "decoder.blocks.": "decoder.module_dict.dec_transformer.blocks.",
    "decoder.output_adaln_modulation.": "decoder.module_dict.dec_to_patches.adaLN_modulation.1.",
    "decoder.output_proj.": "decoder.module_dict.dec_to_patches.proj.",
    "repa_projector.": "decoder.module_dict.dec_repa_head.",  # our projector is laid out as the MLPHead
}
_BLOCK_NAMES = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "proj",
    "gate_proj": "fc1",
    "up_proj": "fc3",
    "down_proj": "fc2",
    "adaln_modulation": "adaLN_modulation.1",
}


def reference_state_dict(model: FlexTokModel) -> dict:
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "decoder.register_position_embeddings":
            state["decoder.module_dict.dec_registers_posemb_module.posembs"] = tensor.T[None, None].contiguous()
            continue
        prefix = next(p for p in _PREFIXES if key.startswith(p))
        new_key = _PREFIXES[prefix] + key[len(prefix) :]
        if ".blocks." in key:
            parts = new_key.split(".")
            new_key = ".".join(_BLOCK_NAMES.get(part, part) for part in parts)
        state[new_key] = tensor.contiguous()
    return state


def write_hub_format(model: FlexTokModel, folder: Path, nodes: dict | None = None, state: dict | None = None):
    """`config.json` (node order kept, as the reference relies on it) + `model.safetensors` + `vae_config.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(nodes or reference_config_nodes(model.config), f)
    save_file(state or reference_state_dict(model), str(folder / "model.safetensors"))
    with open(folder / "vae_config.json", "w") as f:
        json.dump(model.config.vae_config, f)


def write_metadata_format(model: FlexTokModel, file: Path):
    """One `.safetensors` whose `__metadata__` holds each node as a Python-literal string."""
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in reference_config_nodes(model.config).items()}
    save_file(reference_state_dict(model), str(file), metadata=metadata)
