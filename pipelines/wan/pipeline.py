"""``StreamPipeline``: the loaded components (causal Wan transformer, Wan VAE, UMT5 text encoder, tokenizer) and
the entry point for streaming sessions.

Folder layout (diffusers' ``WanPipeline`` layout, so ``Wan2.1-T2V-1.3B-Diffusers`` loads as is)::

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  [stream_runtime.json]

``stream_runtime.json`` (optional) holds this runtime's defaults for the folder: resolution, stream settings,
prompt length and the unknown-word policy. The transformer may come from an original-format causal checkpoint
instead (Self-Forcing, CausVid, LongLive + LoRA, StreamDiffusionV2): ``transformer_checkpoint=...``.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from stream_runtime.config import StreamConfig, check_resolution, text_to_video_config, video_to_video_config

from . import presets
from .taehv import TAEHV, StreamingTAEHVDecoder, load_taehv
from .text import PromptEncoder, build_word_tokenizer
from .transformer import StreamingWanTransformer
from .vae_stream import StreamingVAEDecoder, conv3d_onednn, conv_weights_channels_last, rms_norms_rsqrt, tiny_vae_config

RUNTIME_FILE = "stream_runtime.json"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
MODES = ("t2v", "v2v")
EXAMPLE_PROMPT = "a red fox running through fresh snow, cinematic"
"""The app's starting prompt for models with an open vocabulary (``StreamPipeline.example_prompt``)."""
DECODER_VAE = "vae"
"""Decoder spec: the full Wan VAE (the default)."""
DECODER_TAEHV_PREFIX = "taehv:"
"""Decoder spec prefix: ``taehv:PATH`` decodes with TAEHV weights from PATH (e.g. ``taew2_1.pth``)."""


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class StreamPipeline:
    """Loaded model components plus defaults; opens :class:`~stream_runtime.pipelines.wan.session.StreamSession`.

    Example::

        pipe = StreamPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", device="cuda",
                                              transformer_checkpoint="self_forcing_dmd.pt")
        with pipe.session(prompt="a fox running in snow", seed=0) as s:
            for frames in s:            # uint8 [T, H, W, 3] per chunk
                ...
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        vae: AutoencoderKLWan,
        text_encoder: UMT5EncoderModel,
        tokenizer,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        if transformer.config.in_channels != vae.config.z_dim:
            raise ValueError(
                f"transformer in_channels ({transformer.config.in_channels}) must equal the VAE's z_dim "
                f"({vae.config.z_dim})"
            )
        if transformer.config.text_dim != text_encoder.config.d_model:
            raise ValueError(
                f"transformer text_dim ({transformer.config.text_dim}) must equal the text encoder's d_model "
                f"({text_encoder.config.d_model})"
            )
        self.transformer = transformer
        self.net = StreamingWanTransformer(transformer)
        self.vae = vae
        self._compiled = False
        """:meth:`compile` is on (the VAE then runs the kernels its graphs chose, not :func:`conv3d_onednn` and
        :func:`rms_norms_rsqrt`)."""
        self._route_vae_convs()
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.cuda_graphs = False
        """Sessions opened from now on replay their steady-state passes as CUDA graphs (:meth:`enable_cuda_graphs`)."""
        self.taehv: TAEHV | None = None
        """TAEHV decoder of new sessions (:meth:`set_decoder`); None: the full VAE decodes."""
        self.defaults = dict(defaults or {})
        self.prompts = PromptEncoder(
            tokenizer,
            text_encoder,
            max_tokens=int(self.defaults.get("max_text_tokens", 512)),
            unknown_words=self.defaults.get("unknown_words", "ignore"),
        )

    # -- geometry

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def spatial_factor(self) -> int:
        """Pixels per patch side: the VAE's spatial factor times the transformer's patch size (16 for Wan2.1)."""
        return self.vae.config.scale_factor_spatial * self.transformer.config.patch_size[1]

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def default_resolution(self) -> tuple[int, int]:
        return int(self.defaults.get("height", 480)), int(self.defaults.get("width", 832))

    @property
    def example_prompt(self) -> str:
        """A prompt this model understands (``stream_runtime.json``'s ``example_prompt``; models with a closed
        vocabulary, such as the tiny-world one, set it), for the app's prompt box."""
        return str(self.defaults.get("example_prompt", EXAMPLE_PROMPT))

    def stream_config(self, mode: str = "t2v", **overrides) -> StreamConfig:
        """The folder's stream settings for ``mode`` with ``overrides`` applied."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        saved = dict(self.defaults.get(f"stream_{mode}", {}))
        saved.update(overrides)
        if "timesteps" in saved:
            saved["timesteps"] = tuple(saved["timesteps"])
        if "motion_strength_range" in saved:
            saved["motion_strength_range"] = tuple(saved["motion_strength_range"])
        return text_to_video_config(**saved) if mode == "t2v" else video_to_video_config(**saved)

    def check_resolution(self, height: int, width: int) -> None:
        check_resolution(height, width, self.spatial_factor)

    # -- speed

    def compile(
        self, enabled: bool = True, backend="inductor", mode: str | None = None, ffn_epilogue: bool = False
    ) -> None:
        """``torch.compile`` the streaming hot path: the transformer blocks' halves around self-attention and RoPE
        (:meth:`StreamingWanTransformer.compile_blocks`) and the Wan VAE's encoder and decoder (each latent frame is
        one pass; the causal-conv cache gives three static variants: first, second and later frames). On CUDA the
        VAE's conv weights also go channels-last (:func:`conv_weights_channels_last`: no layout transposes around
        cuDNN's convolutions). ``enabled=False`` restores eager. The first chunks of each new shape pay the compile
        time. ``ffn_epilogue``: the feed-forward's GELU inside its first matmul on CUDA (an option under
        measurement, see :func:`~stream_runtime.pipelines.wan.transformer.ffn_forward`).

        Example::

            pipe = StreamPipeline.from_pretrained(path).to("cuda")
            pipe.compile()  # then warm it up with one short session before serving
        """
        self.net.compile_blocks(enabled, backend=backend, mode=mode, ffn_epilogue=ffn_epilogue)
        self._compiled = enabled
        self._route_vae_convs()
        if self.device.type == "cuda":
            conv_weights_channels_last(self.vae, enabled)
        for module in (self.vae.decoder, self.vae.encoder):
            if enabled:
                module.compile(backend=backend, mode=mode, dynamic=False)
            else:
                module._compiled_call_impl = None  # nn.Module.compile's hook: back to the plain forward

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay each session's steady-state chunk passes (cache full) as CUDA graphs, from the next session on.

        A pass is then one graph launch instead of some thousands of kernel launches, which is what limits small
        chunks (video-to-video). Each session captures its own graph (it binds the session's cache buffers) at its
        first steady-state chunk, which costs about one extra pass then, and holds the graph's activation memory
        until it closes. The output equals the eager pass's. Works with and without :meth:`compile`; see
        :mod:`~stream_runtime.pipelines.wan.graphs` for which passes replay.

        Example::

            pipe.compile()
            pipe.enable_cuda_graphs()
            pipe.warm_up()
        """
        if enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the pipeline on a CUDA device, it is on {self.device}")
        self.cuda_graphs = enabled

    @torch.no_grad()
    def warm_up(
        self,
        modes: tuple[str, ...] = ("t2v", "v2v"),
        chunks: int = 4,
        progress: Callable[[str], None] | None = None,
    ) -> float:
        """Stream ``chunks`` chunks of a scratch session per mode, then the first chunk of a second one, at the
        folder's resolution and stream settings: after :meth:`compile`, every graph a default session needs is
        built (a video-to-video encoder needs about four chunks to reach its steady cache), so the first real
        session is fast. ``progress`` gets one line per chunk. Returns the seconds it took.

        Example::

            pipe.compile()
            pipe.warm_up(progress=print)  # before serving
        """
        start = time.perf_counter()
        height, width = self.default_resolution
        prompt = self.example_prompt
        for mode in modes:
            for stream, count in (("first", chunks), ("second", 1)):
                with self.session(prompt, seed=0, mode=mode) as s:
                    if mode == "v2v":  # black input frames: enough for every chunk (the first takes fewer)
                        frames = (count + 1) * s.config.chunk_frames * self.temporal_factor
                        s.push_frames(np.zeros((frames, height, width, 3), dtype=np.uint8))
                    for i in range(count):
                        t0 = time.perf_counter()
                        s.next_chunk()
                        if progress is not None:
                            took = time.perf_counter() - t0
                            progress(f"warm-up {mode}, {stream} stream, chunk {i + 1}/{count}: {took:.1f} s")
        return time.perf_counter() - start

    # -- decoder

    def set_decoder(self, decoder: str | TAEHV) -> None:
        """Choose what decodes the latents of sessions opened from now on.

        ``decoder``: ``"vae"`` (the full Wan VAE, the default), ``"taehv:PATH"`` (TAEHV weights in the public
        layout, e.g. ``taew2_1.pth``: several times less decoder work, slightly lower quality) or a
        :class:`~stream_runtime.pipelines.wan.taehv.TAEHV` module. The VAE stays loaded: video-to-video still
        encodes its input with it. A TAEHV must have the transformer's latent channels and the VAE's scale factors.

        Example::

            pipe.set_decoder("taehv:/models/taew2_1.pth")
        """
        if isinstance(decoder, str) and decoder == DECODER_VAE:
            self.taehv = None
            return
        path = decoder.removeprefix(DECODER_TAEHV_PREFIX) if isinstance(decoder, str) else ""
        if isinstance(decoder, TAEHV):
            model = decoder
        elif path and path != decoder:
            model = load_taehv(path)
        else:
            raise ValueError(
                f"`decoder` must be {DECODER_VAE!r}, '{DECODER_TAEHV_PREFIX}PATH' or a TAEHV module; got {decoder!r}"
            )
        config, vae_config = model.config, self.vae.config
        latent = self.transformer.config.out_channels or self.transformer.config.in_channels
        if config.latent_channels != latent:
            raise ValueError(
                f"the TAEHV decoder must take the transformer's {latent} latent channels; got a TAEHV with "
                f"latent_channels={config.latent_channels} (taew2_1.pth is for Wan2.1's 16)"
            )
        factors = (config.temporal_factor, config.spatial_factor)
        if factors != (vae_config.scale_factor_temporal, vae_config.scale_factor_spatial):
            raise ValueError(
                f"the TAEHV decoder's (temporal, spatial) factors must equal the VAE's "
                f"({vae_config.scale_factor_temporal}, {vae_config.scale_factor_spatial}); got {factors}"
            )
        vae_weight = next(self.vae.parameters())  # diffusers' .dtype walks every module
        self.taehv = model.to(vae_weight.device, vae_weight.dtype).eval().requires_grad_(False)

    @property
    def decoder_dtype(self) -> torch.dtype:
        """The dtype latents must have for :meth:`streaming_decoder`'s ``decode``."""
        return next((self.taehv or self.vae).parameters()).dtype

    def streaming_decoder(self) -> StreamingVAEDecoder | StreamingTAEHVDecoder:
        """A fresh streaming decoder for one session: TAEHV if :meth:`set_decoder` chose it, else the VAE."""
        return StreamingVAEDecoder(self.vae) if self.taehv is None else StreamingTAEHVDecoder(self.taehv)

    # -- sessions

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt embeddings ``[1, max_tokens, text_dim]`` (cached per prompt) on the transformer's device, wherever
        the text encoder runs (see :meth:`to`)."""
        return self.prompts(prompt).to(self.device)

    def encode_negative_prompt(self, prompt: str) -> torch.Tensor:
        """Embeddings of a guidance negative prompt; ``""`` (the unconditional prompt) is allowed here."""
        return self.prompts(prompt, allow_empty=True).to(self.device)

    def session(
        self,
        prompt: str,
        seed: int = 0,
        mode: str = "t2v",
        height: int | None = None,
        width: int | None = None,
        config: StreamConfig | None = None,
        **overrides,
    ):
        """Open a stream. ``config`` replaces the folder's stream settings; ``overrides`` change single fields
        (``chunk_frames=1``, ``position_mode="bounded"``, ...)."""
        from .session import StreamSession

        if config is None:
            config = self.stream_config(mode, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        dh, dw = self.default_resolution
        return StreamSession(self, prompt, seed, mode, height or dh, width or dw, config)

    # -- loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path: str | pathlib.Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        transformer_checkpoint: str | pathlib.Path | None = None,
        lora: str | pathlib.Path | None = None,
        lora_scale: float = 1.0,
        decoder: str | TAEHV = DECODER_VAE,
        text_encoder_device: str | torch.device | None = None,
    ) -> StreamPipeline:
        """Load a diffusers-layout folder; optionally take the transformer from an original-format causal
        checkpoint file (with a LoRA merged on load, e.g. LongLive).

        ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU. ``decoder``: see :meth:`set_decoder`
        (``"taehv:taew2_1.pth"`` for the tiny TAEHV decoder). ``text_encoder_device``: see :meth:`to`.
        """
        root = pathlib.Path(path)
        if not root.is_dir():
            hint = ""
            if root.is_file():
                hint = (
                    " A single checkpoint file holds only the transformer: pass the Wan2.1 diffusers folder as path "
                    "and the file as transformer_checkpoint (CLI: --model FOLDER --checkpoint FILE)."
                )
            raise ValueError(f"path must be a model folder with model_index.json, got {str(root)!r}.{hint}")
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if transformer_checkpoint is not None and "transformer" in missing:
            missing.remove("transformer")
        if missing:
            raise ValueError(f"model folder {str(root)!r} lacks the component folders {missing}")
        if lora is not None and transformer_checkpoint is None:
            raise ValueError("lora is merged into an original-format checkpoint: pass transformer_checkpoint too")
        device = torch.device(device)
        dtype = dtype or _default_dtype(device)

        if transformer_checkpoint is not None:
            from .convert import DEFAULT_PREFER, load_causal_wan_transformer

            config = None
            if (root / "transformer" / "config.json").is_file():
                raw = WanTransformer3DModel.load_config(root / "transformer")
                config = {k: v for k, v in raw.items() if not k.startswith("_")}
            # A LoRA (LongLive) was trained on the non-EMA generator weights, so take those first when one is given.
            prefer = ("generator", "generator_ema", "model", "state_dict") if lora is not None else DEFAULT_PREFER
            transformer = load_causal_wan_transformer(
                transformer_checkpoint,
                config=config,
                lora_path=lora,
                lora_scale=lora_scale,
                dtype=dtype,
                prefer=prefer,
            )
        else:
            transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
        vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=dtype)
        text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        defaults = {}
        if (root / RUNTIME_FILE).is_file():
            defaults = json.loads((root / RUNTIME_FILE).read_text())
        pipe = cls(transformer, vae, text_encoder, tokenizer, defaults).to(device, text_encoder_device)
        pipe.set_decoder(decoder)
        return pipe

    def to(self, device: str | torch.device, text_encoder_device: str | torch.device | None = None) -> StreamPipeline:
        """Move the models to ``device``, the text encoder to ``text_encoder_device`` if given (else to ``device``).

        ``text_encoder_device="cpu"`` keeps the text encoder off the GPU: it runs once per new prompt (a prompt
        switch waits for it), and Wan2.1's UMT5-XXL encoder is about 5.7B parameters by its config, some 11 GB in
        bf16. Embeddings are moved to ``device`` after encoding."""
        modules = [self.transformer, self.vae] + ([self.taehv] if self.taehv is not None else [])
        for module in modules:
            module.to(device)
        self.text_encoder.to(text_encoder_device if text_encoder_device is not None else device)
        modules.append(self.text_encoder)
        for m in modules:
            m.eval().requires_grad_(False)
        self._route_vae_convs()
        return self

    def _route_vae_convs(self) -> None:
        """The VAE's Conv3d layers through oneDNN and its RMS norms as a sum of squares and an ``rsqrt`` while it runs
        eagerly on the CPU (:func:`conv3d_onednn`, :func:`rms_norms_rsqrt`: PyTorch's default CPU paths for both are
        several times slower at these shapes); as diffusers and PyTorch choose on a GPU or when compiled."""
        on_cpu = next(self.vae.parameters()).device.type == "cpu"
        conv3d_onednn(self.vae, on_cpu and not self._compiled)
        rms_norms_rsqrt(self.vae, on_cpu and not self._compiled)

    def save_pretrained(self, path: str | pathlib.Path) -> None:
        """Write the diffusers-layout folder (and ``stream_runtime.json``) that :meth:`from_pretrained` reads."""
        root = pathlib.Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(root / "transformer")
        self.vae.save_pretrained(root / "vae")
        self.text_encoder.save_pretrained(root / "text_encoder")
        self.tokenizer.save_pretrained(root / "tokenizer")
        index = {
            "_class_name": "WanPipeline",
            "_diffusers_version": "0.42.1",
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (root / RUNTIME_FILE).write_text(json.dumps(self.defaults, indent=2) + "\n")

    @classmethod
    def tiny_random(
        cls,
        seed: int = 0,
        height: int = 64,
        width: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_layers: int = 2,
        **stream_overrides,
    ) -> StreamPipeline:
        """Random weights at a tiny shape: the default until trained weights are given; runs on any CPU.

        Unknown prompt words map to the unknown token (the random model ignores meaning anyway). ``num_layers``:
        transformer blocks (more than two to split the model over more than two pipeline stages).
        """
        words = "a an the and of in on with moving red green blue white black fox cat dog snow desert sea".split()
        tokenizer = build_word_tokenizer(words)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(**presets.tiny_text_encoder_config(len(tokenizer))))
            vae = AutoencoderKLWan(**tiny_vae_config())
            transformer = WanTransformer3DModel(
                **presets.tiny_transformer_config(in_channels=vae.config.z_dim, num_layers=num_layers)
            )
        finally:
            torch.random.set_rng_state(gen_state)
        defaults = {
            "height": height,
            "width": width,
            "max_text_tokens": 16,
            "unknown_words": "fallback",
            "stream_t2v": {k: v for k, v in stream_overrides.items()},
        }
        if dtype != torch.float32:
            transformer, vae, text_encoder = (m.to(dtype) for m in (transformer, vae, text_encoder))
        return cls(transformer, vae, text_encoder, tokenizer, defaults).to(device)


def config_to_json(config: StreamConfig) -> dict[str, Any]:
    """A StreamConfig as JSON-friendly values (for stream_runtime.json and the protocol)."""
    data = asdict(config)
    return {f.name: (list(data[f.name]) if isinstance(data[f.name], tuple) else data[f.name]) for f in fields(config)}
