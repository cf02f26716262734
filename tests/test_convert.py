"""Original-format Wan checkpoints -> diffusers models (``stream_runtime.pipelines.wan.convert``).

The inverse key tables below (diffusers -> original Wan names) are written by hand on purpose: they are the
independent check of diffusers' converters, which ``convert.py`` uses and must not re-implement.
"""

import re

import pytest
import torch
from conftest import assert_close
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

from stream_runtime.pipelines.wan.convert import (
    infer_wan_transformer_config,
    load_causal_wan_transformer,
    load_original_wan_vae,
    load_state_dict_file,
    merge_lora,
    original_to_diffusers_transformer,
    unwrap_original_state_dict,
)

TINY = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    patch_size=(1, 2, 2),
)
HEAD_DIM = {"attention_head_dim": TINY["attention_head_dim"]}
EXACT = 1e-6  # same weights, same ops: outputs must agree to float rounding at most

# diffusers -> original, applied in order to the whole key (the test-only inverse of the converter).
_TRANSFORMER_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' norm2 is the affine cross-attention norm
]


def to_original(key: str) -> str:
    for pattern, repl in _TRANSFORMER_TO_ORIGINAL:
        key = re.sub(pattern, repl, key)
    return key


def _resnet_leaf(rest: str) -> str:
    for new, old in (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                     ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")):  # fmt: skip
        if rest.startswith(new):
            return old + rest[len(new) :]
    return rest


def vae_to_original(key: str) -> str:
    if m := re.match(r"^(encoder|decoder)\.conv_in\.(.+)$", key):
        return f"{m[1]}.conv1.{m[2]}"
    if m := re.match(r"^(quant_conv|post_quant_conv)\.(.+)$", key):
        return {"quant_conv": "conv1.", "post_quant_conv": "conv2."}[m[1]] + m[2]
    if m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key):
        return f"{m[1]}.head.0.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.conv_out\.(.+)$", key):
        return f"{m[1]}.head.2.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_leaf(m[3])}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", key):
        return f"encoder.downsamples.{m[1]}.{_resnet_leaf(m[2])}"
    # Original decoder: per level 3 residual blocks then one resample -> flat index 4 * level + position.
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_resnet_leaf(m[3])}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise AssertionError(f"no inverse for VAE key {key}")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Random norms and modulation tables too, so a swapped or dropped key changes the output.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def native():
    torch.manual_seed(0)
    return _randomize(WanTransformer3DModel(**TINY), seed=1)


@pytest.fixture(scope="module")
def original_sd(native):
    sd = {to_original(k): v.clone() for k, v in native.state_dict().items()}
    assert len(sd) == len(native.state_dict())
    return sd


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(1, TINY["in_channels"], 2, 4, 4, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 3, TINY["text_dim"], generator=gen),
    )


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ---- unwrapping and reading ------------------------------------------------------------------------------------


def test_unwrap_prefers_ema_and_strips_prefixes():
    w, v = torch.ones(2), torch.zeros(2)
    ckpt = {
        "generator": {"model.blocks.0.ffn.0.weight": v},
        "generator_ema": {"model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight": w},
        "step": 600,
    }
    assert unwrap_original_state_dict(ckpt) == {"blocks.0.ffn.0.weight": w}
    assert unwrap_original_state_dict(ckpt, prefer=("generator",))["blocks.0.ffn.0.weight"] is v
    nested = {"state_dict": {"module._orig_mod.model.diffusion_model.head.head.weight": w}}
    assert list(unwrap_original_state_dict(nested)) == ["head.head.weight"]


def test_unwrap_errors():
    with pytest.raises(ValueError, match="critic"):
        unwrap_original_state_dict({"critic": {"a": torch.ones(1)}, "step": 1})
    with pytest.raises(ValueError, match="collide"):
        unwrap_original_state_dict({"model.a": torch.ones(1), "module.a": torch.ones(1)})
    with pytest.raises(TypeError, match="obj"):
        unwrap_original_state_dict([torch.ones(1)])


def test_load_state_dict_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_state_dict_file(tmp_path / "absent.pt")
    wrong = tmp_path / "weights.npz"
    wrong.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        load_state_dict_file(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_state_dict_file(garbage)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_state_dict_file(bad_st)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.ones(1)], not_dict)
    with pytest.raises(ValueError, match="dict of tensors"):
        load_state_dict_file(not_dict)


# ---- transformer ---------------------------------------------------------------------------------------------


def test_converter_round_trip_names(native, original_sd):
    assert original_to_diffusers_transformer(original_sd).keys() == native.state_dict().keys()


def test_infer_config(original_sd):
    config = infer_wan_transformer_config(original_sd, HEAD_DIM)
    assert {k: config[k] for k in TINY} == TINY
    assert config["qk_norm"] == "rms_norm_across_heads" and config["cross_attn_norm"] is True
    assert infer_wan_transformer_config(original_sd, {"num_attention_heads": 2})["attention_head_dim"] == 12
    with pytest.raises(ValueError, match="attention_head_dim"):
        infer_wan_transformer_config(original_sd)  # dim 24 with the default 128-channel heads
    with pytest.raises(ValueError, match="unknown"):
        infer_wan_transformer_config(original_sd, {"heads": 2})


def test_load_pt_generator_ema(tmp_path, native, original_sd, inputs):
    path = tmp_path / "self_forcing.pt"
    decoy = {"model." + k: torch.zeros_like(v) for k, v in original_sd.items()}
    torch.save({"generator": decoy, "generator_ema": {"model." + k: v for k, v in original_sd.items()}}, path)
    model = load_causal_wan_transformer(path, config=HEAD_DIM)
    assert isinstance(model, WanTransformer3DModel) and not model.training
    config = {k: model.config[k] for k in TINY}
    assert {**config, "patch_size": tuple(config["patch_size"])} == TINY
    assert _max_diff(_run(model, inputs), _run(native, inputs)) <= EXACT


def test_load_safetensors(tmp_path, native, original_sd, inputs):
    path = tmp_path / "causvid.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in original_sd.items()}, path)
    model = load_causal_wan_transformer(path, config=HEAD_DIM)
    assert _max_diff(_run(model, inputs), _run(native, inputs)) <= EXACT


def test_load_dtype_keeps_fp32_modules(tmp_path, original_sd):
    path = tmp_path / "flat.pt"
    torch.save(original_sd, path)
    model = load_causal_wan_transformer(path, config=HEAD_DIM, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


def test_strict_load_lists_missing_and_unexpected(tmp_path, original_sd):
    sd = dict(original_sd)
    del sd["blocks.1.self_attn.q.bias"]
    sd["blocks.0.extra.weight"] = torch.ones(3)
    path = tmp_path / "broken.pt"
    torch.save({"generator": sd}, path)
    with pytest.raises(ValueError) as err:
        load_causal_wan_transformer(path, config=HEAD_DIM)
    message = str(err.value)
    assert "1 missing keys" in message and "blocks.1.attn1.to_q.bias" in message
    assert "1 unexpected keys" in message and "blocks.0.extra.weight" in message


def test_strict_load_lists_shape_mismatch(tmp_path, original_sd):
    path = tmp_path / "wide_ffn.pt"
    torch.save(original_sd, path)
    with pytest.raises(ValueError, match=r"shape mismatches.*ffn\.net\.0\.proj\.weight"):
        load_causal_wan_transformer(path, config={**HEAD_DIM, "ffn_dim": 48})


# ---- LoRA ------------------------------------------------------------------------------------------------------

LORA_MODULES = ["blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.0.ffn.0", "blocks.1.ffn.2"]
RANK = 3


def _random_lora(original_sd, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in LORA_MODULES:
        rows, cols = original_sd[module + ".weight"].shape
        out[module] = (torch.randn(RANK, cols, generator=gen), torch.randn(rows, RANK, generator=gen))
    return out


def _expected_model(native, lora, factor):
    """The native model with ``factor * B @ A`` added by hand to each diffusers weight."""
    model = WanTransformer3DModel(**TINY).eval()
    model.load_state_dict(native.state_dict())
    params = dict(model.named_parameters())
    to_diffusers = {to_original(k): k for k in params}
    with torch.no_grad():
        for module, (down, up) in lora.items():
            params[to_diffusers[module + ".weight"]].add_(factor * (up @ down))
    return model


def test_merge_lora_peft_longlive_layout(tmp_path, native, original_sd, inputs):
    lora = _random_lora(original_sd, seed=3)
    peft_sd = {}
    for module, (down, up) in lora.items():
        peft_sd[f"base_model.model.{module}.lora_A.weight"] = down
        peft_sd[f"base_model.model.{module}.lora_B.weight"] = up
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in original_sd.items()}}, base)
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": peft_sd, "critic_lora": {"junk": torch.ones(1)}}, lora_path)
    scale, alpha = 0.5, 6.0
    model = load_causal_wan_transformer(base, config=HEAD_DIM, lora_path=lora_path, lora_scale=scale, lora_alpha=alpha)
    expected = _expected_model(native, lora, scale * alpha / RANK)
    assert _max_diff(_run(model, inputs), _run(expected, inputs)) <= EXACT


def test_merge_lora_peft_adapter_name_default_alpha(original_sd):
    lora = _random_lora(original_sd, seed=4)
    peft_sd = {}
    for module, (down, up) in lora.items():
        peft_sd[f"{module}.lora_A.default.weight"] = down
        peft_sd[f"{module}.lora_B.default.weight"] = up
    merged = merge_lora(original_sd, peft_sd)  # alpha defaults to the rank: factor 1
    for module, (down, up) in lora.items():
        assert_close(merged[module + ".weight"], original_sd[module + ".weight"] + up @ down)
    untouched = "blocks.0.self_attn.k.weight"
    assert merged[untouched] is original_sd[untouched]


def test_merge_lora_kohya(tmp_path, native, original_sd, inputs):
    lora = _random_lora(original_sd, seed=5)
    alpha = 1.5
    kohya = {}
    for i, (module, (down, up)) in enumerate(lora.items()):
        # Half dotted, half flattened with underscores as kohya's trainers write them.
        name = module if i % 2 else "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = down
        kohya[f"{name}.lora_up.weight"] = up
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in original_sd.items()}, base)
    lora_path = tmp_path / "kohya.safetensors"
    save_file(kohya, lora_path)
    model = load_causal_wan_transformer(base, config=HEAD_DIM, lora_path=lora_path)
    expected = _expected_model(native, lora, alpha / RANK)
    assert _max_diff(_run(model, inputs), _run(expected, inputs)) <= EXACT


def test_merge_lora_errors(original_sd):
    down, up = torch.ones(RANK, 24), torch.ones(24, RANK)
    with pytest.raises(ValueError, match=r"blocks\.0\.self_attn\.nope\.lora_A\.weight.*no base weight"):
        merge_lora(
            original_sd, {"blocks.0.self_attn.nope.lora_A.weight": down, "blocks.0.self_attn.nope.lora_B.weight": up}
        )
    with pytest.raises(ValueError, match="does not fit"):
        merge_lora(original_sd, {"blocks.0.ffn.0.lora_A.weight": down, "blocks.0.ffn.0.lora_B.weight": up})
    with pytest.raises(ValueError, match="no B/up partner"):
        merge_lora(original_sd, {"blocks.0.self_attn.q.lora_A.weight": down})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        merge_lora(original_sd, {"blocks.0.self_attn.q.lora_magnitude_vector": down})


# ---- VAE -------------------------------------------------------------------------------------------------------


def test_load_original_vae(tmp_path):
    torch.manual_seed(0)
    native = _randomize(AutoencoderKLWan(base_dim=8, z_dim=4), seed=6)
    original = {vae_to_original(k): v for k, v in native.state_dict().items()}
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, path)
    vae = load_original_wan_vae(path)
    assert vae.config.base_dim == 8 and vae.config.z_dim == 4
    loaded = vae.state_dict()
    assert loaded.keys() == native.state_dict().keys()
    for key, value in native.state_dict().items():
        assert torch.equal(loaded[key], value), key

    del original["decoder.head.0.gamma"]
    torch.save(original, path)
    with pytest.raises(ValueError, match=r"decoder\.norm_out\.gamma"):
        load_original_wan_vae(path)
