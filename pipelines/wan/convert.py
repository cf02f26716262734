"""Load original-format (Wan repo key names) causal Wan checkpoints into diffusers models.

Self-Forcing, CausVid, LongLive and StreamDiffusionV2 ship generator weights with the *original* Wan key names
(``blocks.N.self_attn.q.weight``, ``head.head.weight``, ``blocks.N.modulation`` ...), wrapped in a training
checkpoint (``{"generator": sd, "generator_ema": sd, ...}``) and prefixed by their wrappers (``model.`` from
``WanDiffusionWrapper.model``, ``_fsdp_wrapped_module.`` from FSDP, ``_orig_mod.`` from ``torch.compile``).
This module unwraps them, optionally merges a LoRA in original names, renames with diffusers' own converters
(``convert_wan_transformer_to_diffusers`` / ``convert_wan_vae_to_diffusers``; no key table lives here) and
loads *strictly*: a key the model lacks or a model key the checkpoint lacks is an error, never a silent skip.

Example::

    net = load_causal_wan_transformer("checkpoints/self_forcing_dmd.pt", dtype=torch.bfloat16, device="cuda")
    net = load_causal_wan_transformer(
        "longlive_models/models/longlive_base.pt", prefer=("generator",),
        lora_path="longlive_models/models/lora.pt",
    )
    vae = load_original_wan_vae("wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")

Checkpoint conventions checked against the reference repositories' loading code (public sources, read during
development; nothing copied):

- Self-Forcing ``inference.py`` loads ``state_dict["generator_ema" if use_ema else "generator"]`` and its
  README's inference command passes ``--use_ema``; hence EMA first in :data:`DEFAULT_PREFER`.
- LongLive's ``configs/longlive_inference.yaml`` sets ``use_ema: false`` (loads ``"generator"``) and strips
  ``_fsdp_wrapped_module.`` when it does load ``"generator_ema"``. Its LoRA was trained on the ``"generator"``
  weights, so pass ``prefer=("generator",)`` for LongLive if its base file also holds an EMA copy.
- StreamDiffusionV2 ``streamv2v/inference.py`` takes ``"generator"``, then ``"generator_ema"``, then
  ``"state_dict"``, else the file itself.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from diffusers.models.modeling_utils import no_init_weights
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

PathLike = str | os.PathLike

TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)

DEFAULT_PREFER: tuple[str, ...] = ("generator_ema", "generator", "model", "state_dict")
"""Sub-dicts of a training checkpoint tried in order. EMA first because Self-Forcing's documented inference
command loads the EMA weights (``--use_ema``); LongLive and StreamDiffusionV2 default to ``"generator"``."""

LORA_PREFER: tuple[str, ...] = ("generator_lora", "lora", "state_dict")
"""Sub-dicts of a LoRA file tried in order: LongLive saves ``{"generator_lora": ..., "critic_lora": ...}``."""

# Leading prefixes added by training wrappers (``WanDiffusionWrapper.model``, DDP ``module.``, ComfyUI / LDM
# ``model.diffusion_model.``). Original Wan root modules are blocks/head/patch_embedding/..., never these.
LEADING_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.")
# Wrapper modules that FSDP, activation checkpointing and torch.compile insert at any depth of a key.
INNER_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# PEFT's ``PeftModel`` / ``LoraModel`` nesting in front of the wrapped model's own names.
PEFT_PREFIX = "base_model.model."
# Prefixes of kohya-style LoRA keys whose module path is flattened with underscores.
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "diffusion_model_")

DEFAULT_HEAD_DIM = 128
"""Every released Wan2.1 model (1.3B: 1536 = 12 x 128, 14B: 5120 = 40 x 128) uses 128-channel heads; the head
count is not recoverable from shapes because q/k RMSNorm weights span all heads."""

MAX_LISTED_KEYS = 20


def _list_keys(keys: Sequence[str]) -> str:
    """``[a, b, ...] (N in all)``, at most :data:`MAX_LISTED_KEYS` names."""
    keys = list(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED_KEYS else f" ({len(keys)} in all)"
    return f"[{shown}]{more}"


def _torch_load(path: str) -> object:
    try:
        # mmap keeps multi-GB training checkpoints (generator + EMA + critic) out of RAM until a tensor is used.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    # Legacy (pre-zipfile) torch.save files cannot be memory-mapped.
    return torch.load(path, map_location="cpu", weights_only=True)


def _unpickle_reason(err: Exception) -> str:
    """The one informative line of torch's long weights-only failure message."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
    return found[1].strip() if found else str(err).splitlines()[0]


def load_state_dict_file(path: PathLike, prefer: Sequence[str] = DEFAULT_PREFER) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth``/``.ckpt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file and
    return its flat ``{name: tensor}`` state dict, unwrapped by :func:`unwrap_original_state_dict`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unknown extension, an unreadable
    file, or content that is not a (nested) dict of tensors.

    Example::

        sd = load_state_dict_file("self_forcing_dmd.pt")   # {"blocks.0.self_attn.q.weight": tensor, ...}
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"path: expected a single checkpoint file, got the directory {path!r} (a diffusers model folder loads "
            "with WanTransformer3DModel.from_pretrained / AutoencoderKLWan.from_pretrained)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS:
        raise ValueError(
            f"path: expected a file ending in one of {TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS}, got {path!r}"
        )
    try:
        obj = load_safetensors(path) if ext in SAFETENSORS_EXTENSIONS else _torch_load(path)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"path: torch.load(weights_only=True) could not unpickle {path!r} ({_unpickle_reason(err)}): it is not "
            "a torch checkpoint, or it holds objects other than tensors and plain containers; if you trust the "
            "file, re-save only its state dicts (torch.save({'generator': model.state_dict()}, ...))"
        ) from err
    except (RuntimeError, SafetensorError, EOFError, OSError) as err:
        raise ValueError(f"path: could not read {path!r} as a {ext} checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"path: expected {path!r} to hold a dict of tensors, got {type(obj).__name__}")
    return unwrap_original_state_dict(obj, prefer=prefer)


def strip_wrapper_prefixes(key: str) -> str:
    """Remove training-wrapper names from one key.

    ``model._fsdp_wrapped_module.blocks.0.self_attn.q.weight`` -> ``blocks.0.self_attn.q.weight``: the
    :data:`INNER_WRAPPERS` anywhere, then the :data:`LEADING_PREFIXES` repeatedly from the front.
    """
    for wrapper in INNER_WRAPPERS:
        key = key.replace(wrapper, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in LEADING_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def unwrap_original_state_dict(obj: Mapping, prefer: Sequence[str] = DEFAULT_PREFER) -> dict[str, torch.Tensor]:
    """Pick the weights out of a training checkpoint and strip wrapper prefixes from their names.

    While ``obj`` is not a flat dict of tensors, descend into the first key of ``prefer`` it holds (default
    :data:`DEFAULT_PREFER`: ``generator_ema``, ``generator``, ``model``, ``state_dict`` -- EMA first, see the
    module docstring for which reference repository loads which); then apply :func:`strip_wrapper_prefixes`
    to every key.

    Example::

        unwrap_original_state_dict({"generator_ema": {"model.blocks.0.ffn.0.weight": w}, "step": 600})
        # -> {"blocks.0.ffn.0.weight": w}
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"obj: expected a dict (a state dict or a checkpoint holding one), got {type(obj).__name__}")
    node, trail = obj, []
    while not all(isinstance(v, torch.Tensor) for v in node.values()):
        choice = next((k for k in prefer if isinstance(node.get(k), Mapping)), None)
        if choice is None:
            where = "".join(f"[{k!r}]" for k in trail) or "the top level"
            other = [str(k) for k, v in node.items() if not isinstance(v, torch.Tensor)]
            raise ValueError(
                f"obj: expected a flat dict of tensors or a sub-dict under one of {tuple(prefer)} at {where}; "
                f"found non-tensor entries {_list_keys(other)} (pass prefer=(...) naming the sub-dict to use)"
            )
        node = node[choice]
        trail.append(choice)
    if not node:
        raise ValueError("obj: the selected state dict is empty")
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    clashes = []
    for key, value in node.items():
        if not isinstance(key, str):
            raise ValueError(f"obj: expected string keys, got {key!r}")
        new = strip_wrapper_prefixes(key)
        if new in out:
            clashes.append(f"{sources[new]} / {key} -> {new}")
        out[new], sources[new] = value, key
    if clashes:
        raise ValueError(f"obj: keys collide once wrapper prefixes are stripped: {_list_keys(clashes)}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# LoRA


_LORA_WEIGHT = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_LORA_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_DOWN, _UP = "down", "up"
_KIND = {"lora_A": _DOWN, "lora_down": _DOWN, "lora_B": _UP, "lora_up": _UP}


def _lora_module_name(raw: str, flat_names: Mapping[str, str]) -> str:
    """Map a LoRA module path to the base state dict's module name (original Wan names)."""
    name = raw[len(PEFT_PREFIX) :] if raw.startswith(PEFT_PREFIX) else raw
    name = strip_wrapper_prefixes(name)
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix) and "." not in name:
            flat = name[len(prefix) :]
            return flat_names.get(flat, flat)
    return name


def merge_lora(
    sd: Mapping[str, torch.Tensor],
    lora_sd: Mapping[str, torch.Tensor],
    scale: float = 1.0,
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """Return a copy of ``sd`` with ``W += scale * (alpha / r) * B @ A`` merged into each LoRA'd linear weight.

    ``sd`` uses original Wan names (``blocks.0.self_attn.q.weight``, ``[out, in]``); ``lora_sd`` may be

    - PEFT: ``[base_model.model.]<module>.lora_A[.<adapter>].weight`` (``A``: ``[r, in]``) and ``.lora_B``
      (``B``: ``[out, r]``), e.g. ``base_model.model.blocks.0.ffn.0.lora_A.weight``;
    - kohya: ``<module>.lora_down.weight`` (A), ``<module>.lora_up.weight`` (B) and an optional scalar
      ``<module>.alpha``; the module path may be dotted or flattened (``lora_unet_blocks_0_self_attn_q``).

    Wrapper prefixes (``model.``, ``_fsdp_wrapped_module.`` ...) are stripped as for the base weights.
    ``alpha``: if given it applies to every module; else a module's stored kohya ``.alpha``; else ``r`` (a
    factor of 1). PEFT files do not store ``lora_alpha`` (it lives in ``adapter_config.json``, default 8 there),
    so pass ``alpha`` for PEFT LoRAs trained with ``lora_alpha != r``. The product runs in fp32; merged weights
    keep the base dtype.

    LongLive (verified from its public code and config, not from the released file): ``utils/lora_utils.py``
    wraps ``CausalWanModel`` with ``peft.get_peft_model`` targeting every ``nn.Linear`` inside each
    ``CausalWanAttentionBlock`` (``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``, ``ffn.0``, ``ffn.2``), saves
    ``get_peft_model_state_dict`` (adapter name removed, ``base_model.model.`` kept) under ``"generator_lora"``,
    and ``configs/longlive_inference.yaml`` sets ``rank: 256, alpha: 256`` (factor 1, the default here).
    Assumed: the released ``lora.pt`` follows that code path (keys not inspected here).

    Raises ``ValueError`` listing every LoRA key that is unrecognised, lacks its A/B partner, has no base weight,
    or whose shapes do not fit the base weight.
    """
    flat_names = {}
    for key in sd:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            flat_names.setdefault(module.replace(".", "_"), module)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    stored_alpha: dict[str, float] = {}
    sources: dict[str, list[str]] = {}
    adapters, problems = set(), []
    for key, value in lora_sd.items():
        if m := _LORA_WEIGHT.match(key):
            module = _lora_module_name(m["module"], flat_names)
            kind = _KIND[m["kind"]]
            if m["adapter"] is not None:
                adapters.add(m["adapter"])
            if kind in pairs.setdefault(module, {}):
                problems.append(f"{key} (a second {m['kind']} for {module})")
            pairs[module][kind] = value
            sources.setdefault(module, []).append(key)
        elif m := _LORA_ALPHA.match(key):
            stored_alpha[_lora_module_name(m["module"], flat_names)] = float(value)
        else:
            problems.append(f"{key} (not a lora_A/lora_B/lora_down/lora_up weight or .alpha)")
    if len(adapters) > 1:
        problems.append(f"several PEFT adapters in one file {sorted(adapters)}; keep one")

    merged = dict(sd)
    for module, parts in pairs.items():
        label = sources[module][0]
        base_key = f"{module}.weight"
        if _DOWN not in parts or _UP not in parts:
            missing = "A/down" if _DOWN not in parts else "B/up"
            problems.append(f"{label} (no {missing} partner for {module})")
            continue
        if base_key not in sd:
            problems.append(f"{label} (no base weight {base_key})")
            continue
        down, up, weight = parts[_DOWN], parts[_UP], sd[base_key]
        if down.ndim != 2 or up.ndim != 2 or weight.ndim != 2:
            problems.append(f"{label} (only linear LoRAs are supported; A {tuple(down.shape)}, B {tuple(up.shape)})")
            continue
        rank = down.shape[0]
        if up.shape[1] != rank or (up.shape[0], down.shape[1]) != tuple(weight.shape):
            problems.append(
                f"{label} (B {tuple(up.shape)} @ A {tuple(down.shape)} does not fit {base_key} {tuple(weight.shape)})"
            )
            continue
        module_alpha = alpha if alpha is not None else stored_alpha.get(module, float(rank))
        delta = (scale * module_alpha / rank) * (up.float() @ down.float())
        merged[base_key] = (weight.float() + delta).to(weight.dtype)
    orphans = sorted(set(stored_alpha) - set(pairs))
    problems += [f"{module}.alpha (no lora weights for {module})" for module in orphans]
    if problems:
        raise ValueError(f"lora_sd: {len(problems)} LoRA entries cannot be merged: {_list_keys(problems)}")
    return merged


# ----------------------------------------------------------------------------------------------------------------
# transformer


def original_to_diffusers_transformer(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and rename original Wan transformer keys to diffusers' with
    ``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`` (``sd`` is not modified).

    Example: ``blocks.0.self_attn.q.weight`` -> ``blocks.0.attn1.to_q.weight``, ``blocks.0.norm3`` ->
    ``blocks.0.norm2``, ``head.modulation`` -> ``scale_shift_table``.
    """
    sd = {strip_wrapper_prefixes(k): v for k, v in sd.items()}
    if any(k.startswith("condition_embedder.") for k in sd):
        raise ValueError(
            "sd: expected original Wan key names (time_embedding.0.weight, blocks.N.self_attn.q.weight, ...), "
            "got diffusers names (condition_embedder.*); load it with WanTransformer3DModel.from_pretrained"
        )
    # The converter pops from its argument; hand it a shallow copy.
    return convert_wan_transformer_to_diffusers(dict(sd))


def _require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"sd: cannot infer {what} without {key!r}; pass it in config=... or check the checkpoint")
    return sd[key]


def infer_wan_transformer_config(sd: Mapping[str, torch.Tensor], overrides: Mapping | None = None) -> dict:
    """``WanTransformer3DModel`` kwargs read from original-name weight shapes, then ``overrides`` on top.

    Inferred: ``patch_size``, ``in_channels`` (``patch_embedding.weight`` ``[dim, in, pt, ph, pw]``),
    ``out_channels`` (``head.head.weight`` rows / patch volume), ``num_layers`` (``blocks.N`` count),
    ``ffn_dim`` (``blocks.0.ffn.0.weight``), ``text_dim`` (``text_embedding.0.weight``), ``freq_dim``
    (``time_embedding.0.weight``), ``qk_norm`` / ``cross_attn_norm`` (presence of ``norm_q`` / ``norm3``) and,
    for I2V weights, ``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``.
    Not recoverable from shapes, so taken from ``overrides`` or defaulted: ``attention_head_dim``
    (:data:`DEFAULT_HEAD_DIM`, or ``dim // num_attention_heads`` when only the head count is given),
    ``eps`` and ``rope_max_seq_len`` (diffusers' defaults, 1e-6 and 1024, as in the original model).
    """
    overrides = dict(overrides or {})
    allowed = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    if unknown := sorted(set(overrides) - allowed):
        raise ValueError(
            f"config: unknown WanTransformer3DModel arguments {unknown}; expected a subset of {sorted(allowed)}"
        )
    patch = _require(sd, "patch_embedding.weight", "dim / in_channels / patch_size")
    dim, in_channels, patch_size = patch.shape[0], patch.shape[1], tuple(patch.shape[2:])
    head = _require(sd, "head.head.weight", "out_channels")
    if head.shape[0] % math.prod(patch_size):
        raise ValueError(f"sd: head.head.weight rows {head.shape[0]} are not a multiple of patch volume {patch_size}")
    block_ids = {int(m[1]) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if block_ids != set(range(len(block_ids))) or not block_ids:
        raise ValueError(f"sd: expected blocks.0 ... blocks.N-1, got block indices {sorted(block_ids)}")
    if "attention_head_dim" in overrides:
        head_dim = overrides["attention_head_dim"]
    elif "num_attention_heads" in overrides:
        head_dim = dim // overrides["num_attention_heads"]
    else:
        head_dim = DEFAULT_HEAD_DIM
    config = {
        "patch_size": patch_size,
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "in_channels": in_channels,
        "out_channels": head.shape[0] // math.prod(patch_size),
        "text_dim": _require(sd, "text_embedding.0.weight", "text_dim").shape[1],
        "freq_dim": _require(sd, "time_embedding.0.weight", "freq_dim").shape[1],
        "ffn_dim": _require(sd, "blocks.0.ffn.0.weight", "ffn_dim").shape[0],
        "num_layers": len(block_ids),
        "cross_attn_norm": "blocks.0.norm3.weight" in sd,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
    }
    if "img_emb.proj.1.weight" in sd:
        config["image_dim"] = sd["img_emb.proj.1.weight"].shape[1]
        config["added_kv_proj_dim"] = _require(sd, "blocks.0.cross_attn.k_img.weight", "added_kv_proj_dim").shape[1]
        if "img_emb.emb_pos" in sd:
            config["pos_embed_seq_len"] = sd["img_emb.emb_pos"].shape[1]
    config.update(overrides)
    if config["num_attention_heads"] * config["attention_head_dim"] != dim:
        raise ValueError(
            f"config: num_attention_heads x attention_head_dim must equal the checkpoint's hidden size {dim}, got "
            f"{config['num_attention_heads']} x {config['attention_head_dim']} (attention_head_dim defaults to "
            f"{DEFAULT_HEAD_DIM}, Wan2.1's); pass attention_head_dim or num_attention_heads in config"
        )
    return config


def _load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a ``ValueError`` naming every key and shape problem."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {what} {_list_keys(keys)}"
            for what, keys in (
                ("missing keys (model has, checkpoint lacks)", missing),
                ("unexpected keys (checkpoint has, model lacks)", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise ValueError(
            f"{source} does not match {type(model).__name__}: " + "; ".join(parts) + ". Names are after "
            "conversion to diffusers; check the config (pass config=... to override what was inferred) or whether "
            "diffusers' converter handles this checkpoint variant."
        )
    model.load_state_dict(sd, strict=True)


def _cast(model: torch.nn.Module, dtype: torch.dtype, keep_fp32: Sequence[str]) -> None:
    """Cast floating parameters and buffers to ``dtype`` except those under a module named in ``keep_fp32``,
    the rule diffusers' ``from_pretrained(torch_dtype=...)`` applies with ``_keep_in_fp32_modules``."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point():
            keep = any(part in keep_fp32 for part in name.split("."))
            tensor.data = tensor.data.to(torch.float32 if keep else dtype)


def _build(cls: type, config: Mapping, sd: Mapping[str, torch.Tensor], source: str, dtype, device) -> torch.nn.Module:
    with no_init_weights(), torch.device(device):  # every weight is overwritten by the strict load
        model = cls(**config)
    _load_strict(model, sd, source)
    _cast(model, dtype, getattr(model, "_keep_in_fp32_modules", None) or ())
    return model.eval().requires_grad_(False)


def load_causal_wan_transformer(
    path: PathLike,
    config: Mapping | None = None,
    lora_path: PathLike | None = None,
    lora_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    lora_alpha: float | None = None,
    prefer: Sequence[str] = DEFAULT_PREFER,
) -> WanTransformer3DModel:
    """Build a diffusers ``WanTransformer3DModel`` from an original-format (causal) Wan checkpoint.

    Steps: :func:`load_state_dict_file` (sub-dict chosen by ``prefer``, wrapper prefixes stripped); if
    ``lora_path`` is given, :func:`merge_lora` of its ``"generator_lora"`` (or flat) state dict with
    ``lora_scale`` / ``lora_alpha``; :func:`infer_wan_transformer_config` with ``config`` as overrides;
    :func:`original_to_diffusers_transformer`; a strict load (``ValueError`` listing missing / unexpected /
    mis-shaped keys). The model is built on ``device``, returned in ``eval()`` mode without gradients, its floating
    tensors cast to ``dtype`` except diffusers' ``_keep_in_fp32_modules`` (norms, time embedder, modulation
    tables, rope), as ``from_pretrained(torch_dtype=dtype)`` would.

    Example::

        net = load_causal_wan_transformer("self_forcing_dmd.pt", dtype=torch.bfloat16, device="cuda")
        net.config.num_layers  # 30 for Wan2.1-T2V-1.3B
    """
    sd = load_state_dict_file(path, prefer=prefer)
    if lora_path is not None:
        sd = merge_lora(sd, load_state_dict_file(lora_path, prefer=LORA_PREFER), scale=lora_scale, alpha=lora_alpha)
    full_config = infer_wan_transformer_config(sd, config)
    converted = original_to_diffusers_transformer(sd)
    return _build(WanTransformer3DModel, full_config, converted, f"checkpoint {os.fspath(path)!r}", dtype, device)


# ----------------------------------------------------------------------------------------------------------------
# VAE


def infer_wan_vae_config(sd: Mapping[str, torch.Tensor], overrides: Mapping | None = None) -> dict:
    """``AutoencoderKLWan`` kwargs from original Wan2.1 VAE weight shapes, then ``overrides`` on top.

    Inferred: ``base_dim`` and ``in_channels`` (``encoder.conv1.weight``), ``z_dim`` (``conv2.weight``, the
    post-quant conv), ``out_channels`` and ``decoder_base_dim`` (``decoder.head.2.weight``). Everything else
    (``dim_mult``, ``num_res_blocks``, ``temperal_downsample``, ``latents_mean``/``latents_std``) keeps diffusers'
    Wan2.1 defaults, which are also the only layout ``convert_wan_vae_to_diffusers`` maps.
    """
    overrides = dict(overrides or {})
    allowed = set(inspect.signature(AutoencoderKLWan.__init__).parameters) - {"self"}
    if unknown := sorted(set(overrides) - allowed):
        raise ValueError(
            f"config: unknown AutoencoderKLWan arguments {unknown}; expected a subset of {sorted(allowed)}"
        )
    conv_in = _require(sd, "encoder.conv1.weight", "base_dim / in_channels")
    conv_out = _require(sd, "decoder.head.2.weight", "out_channels")
    config = {
        "base_dim": conv_in.shape[0],
        "in_channels": conv_in.shape[1],
        "z_dim": _require(sd, "conv2.weight", "z_dim").shape[0],
        "out_channels": conv_out.shape[0],
    }
    if conv_out.shape[1] != conv_in.shape[0]:
        config["decoder_base_dim"] = conv_out.shape[1]
    config.update(overrides)
    return config


def load_original_wan_vae(
    path: PathLike,
    config: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    prefer: Sequence[str] = DEFAULT_PREFER,
) -> AutoencoderKLWan:
    """Build a diffusers ``AutoencoderKLWan`` from an original Wan2.1 VAE file (``Wan2.1_VAE.pth``).

    Same steps as :func:`load_causal_wan_transformer`: unwrap, infer the config
    (:func:`infer_wan_vae_config`, ``config`` overrides), rename with diffusers'
    ``convert_wan_vae_to_diffusers`` and load strictly. Returned in ``eval()`` mode without gradients.

    Example::

        vae = load_original_wan_vae("wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", dtype=torch.bfloat16)
    """
    sd = load_state_dict_file(path, prefer=prefer)
    full_config = infer_wan_vae_config(sd, config)
    converted = convert_wan_vae_to_diffusers(dict(sd))
    return _build(AutoencoderKLWan, full_config, converted, f"checkpoint {os.fspath(path)!r}", dtype, device)
