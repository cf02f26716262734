"""Block-causal streaming forward passes over diffusers' ``WanTransformer3DModel``.

The weights and modules are diffusers' own (``WanTransformerBlock``, ``WanAttention``, the condition embedder);
this file only changes how they are called:

- ``forward_chunk``: one chunk of latent frames against a :class:`~stream_runtime.cache.RollingKVCache`, with
  the prompt's cross-attention K/V computed once per prompt (:meth:`text_kv`), per-frame timesteps, and
  self-attention through :func:`stream_runtime.attention.attention` so other kernels can plug in.
- ``forward_full``: the whole sequence at once under a frame-level mask (block-causal, optionally sink + window):
  the reference the streaming path is tested against, and the training pass.

Both share the block code below, so the tests hold the cache logic, not the arithmetic, to account; the block
code itself is checked against diffusers' ``WanTransformer3DModel.forward`` in the tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn

from stream_runtime.attention import attention
from stream_runtime.cache import RollingKVCache

from .rope import apply_rope, rope_cos_sin

TextKV = list[tuple[torch.Tensor, torch.Tensor]] | dict[int, tuple[torch.Tensor, torch.Tensor]]
"""Cross-attention K/V per block, indexed by block number (a list for the whole model, a dict for a stage)."""


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


@dataclass
class BatchConditioning:
    """What every block of one stream-batch forward needs besides the activations: rebuilt on each pipeline stage
    from host metadata (timesteps, frame numbers, the cache's bookkeeping), so only activations travel."""

    frames: int
    """Latent frames per chunk (all chunks of a batch have the same number)."""
    grid: tuple[int, int]
    """Patch grid of one frame."""
    temb: torch.Tensor
    """Time embedding ``[B, F, dim]`` (the head's modulation)."""
    mod: torch.Tensor
    """Block modulation input ``[B, F, 6, dim]``."""
    q_cos: torch.Tensor
    """RoPE of the chunks' own tokens, ``[B, F*h*w, 1, D/2]`` (``[F*h*w, 1, D/2]`` when shared by every chunk)."""
    q_sin: torch.Tensor
    k_cos: torch.Tensor | None = None
    """Bounded positions only: RoPE of ``[kept frames | chunk]`` keys (cached keys are stored unrotated)."""
    k_sin: torch.Tensor | None = None


class StreamingWanTransformer(nn.Module):
    """Streaming view of a (text-to-video) ``WanTransformer3DModel``; holds no weights of its own.

    Example::

        net = StreamingWanTransformer(WanTransformer3DModel.from_pretrained(path, subfolder="transformer"))
        text = net.text_kv(prompt_embeds)                        # once per prompt
        flow = net.forward_chunk(x, t, text, cache, first_frame)  # x: [B, 16, 3, 60, 104]
    """

    def __init__(self, wan: WanTransformer3DModel) -> None:
        super().__init__()
        cfg = wan.config
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise ValueError("image-conditioned Wan models (I2V) are not supported by the streaming transformer")
        self.wan = wan
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.patch_size = tuple(cfg.patch_size)
        self.in_channels = cfg.in_channels
        self.num_layers = cfg.num_layers
        self._rope_memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._regions = _Regions()

    # Read off one weight: diffusers' ModelMixin.device/.dtype walk every module, which costs more than a whole
    # tiny-model forward on a CPU.
    @property
    def dtype(self) -> torch.dtype:
        return self.wan.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wan.patch_embedding.weight.device

    def grid(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """Patch grid (rows, columns) of one latent frame."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(
                f"latent size must be divisible by the patch size {(ph, pw)}, got {(latent_height, latent_width)}"
            )
        return latent_height // ph, latent_width // pw

    # -- conditioning

    def text_kv(self, text_embeds: torch.Tensor, layers: range | None = None) -> TextKV:
        """Cross-attention K/V for prompt embeddings ``[B, Lt, text_dim]``: ``[(k, v)]`` with ``k, v [B, Lt, H, D]``
        for every block, or ``{layer: (k, v)}`` for the blocks in ``layers`` (a pipeline stage). Computed once per
        prompt, reused by every chunk and step."""
        ctx = self.wan.condition_embedder.text_embedder(text_embeds.to(self.dtype))
        out = {}
        for i in range(self.num_layers) if layers is None else layers:
            attn = self.wan.blocks[i].attn2
            if getattr(attn, "fused_projections", False):
                k, v = attn.to_kv(ctx).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(ctx), attn.to_v(ctx)
            out[i] = (_heads(attn.norm_k(k), self.heads), _heads(v, self.heads))
        return list(out.values()) if layers is None else out

    def _time(self, timestep: torch.Tensor | float, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame time embedding ``[B, F, dim]`` and block modulation input ``[B, F, 6, dim]``."""
        emb = self.wan.condition_embedder
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(device=self.device, dtype=torch.float32)
        else:  # a kernel fill, not a host-to-device copy: no synchronisation
            t = torch.full((), float(timestep), dtype=torch.float32, device=self.device)
        if t.shape not in ((), (batch,), (batch, frames)):
            raise ValueError(f"timestep must be a scalar, [B] or [B, F] = {[batch, frames]}, got {list(t.shape)}")
        t = t.reshape(-1, 1).expand(batch, frames) if t.ndim < 2 else t
        proj = emb.timesteps_proj(t.reshape(-1))
        proj = proj.to(next(emb.time_embedder.parameters()).dtype)
        temb = emb.time_embedder(proj).to(self.dtype)
        mod = emb.time_proj(emb.act_fn(temb))
        return temb.view(batch, frames, -1), mod.view(batch, frames, 6, -1)

    def _rope(self, positions: list[int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for frame positions, memoised: the steps and context pass of a chunk share them, and in the
        bounded mode every steady-state chunk has the same positions."""
        key = (tuple(positions), grid, self.device)
        if key not in self._rope_memo:
            if len(self._rope_memo) >= 8:
                self._rope_memo.pop(next(iter(self._rope_memo)))
            self._rope_memo[key] = rope_cos_sin(positions, grid, self.head_dim, device=self.device)
        return self._rope_memo[key]

    # -- shared pieces of the two forward passes

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"latents must be [B, {self.in_channels}, F, h, w], got {list(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"latents must be on the model's device {self.device}, got {x.device}")
        tokens = self.wan.patch_embedding(x.to(self.dtype))
        return tokens.flatten(2).transpose(1, 2).contiguous()

    def _block(self, block, x: torch.Tensor, frames: int, mod: torch.Tensor, text: tuple, self_attn) -> torch.Tensor:
        """One ``WanTransformerBlock`` with per-frame modulation; ``self_attn(q, k, v) -> out`` does attention.

        The two halves around self-attention are plain tensor functions (:func:`block_pre_attention`,
        :func:`block_post_attention`), so :meth:`compile_blocks` can fuse their elementwise work while attention and the
        cache stay eager."""
        q, k, v = self._regions.pre(block, x, frames, mod, self.heads)
        y = self_attn(q, k, v)
        return self._regions.post(block, x, y, frames, mod, text[0], text[1])

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._regions.rope(x, cos, sin)

    def compile_blocks(
        self, enabled: bool = True, backend="inductor", mode: str | None = None, ffn_epilogue: bool = False
    ) -> None:
        """Run the block halves and RoPE through ``torch.compile`` (``enabled=False`` restores eager).

        ``ffn_epilogue``: the feed-forward's GELU inside its first matmul on CUDA (:func:`ffn_forward`), compiled or
        eager; an option the GPU benchmark measures (`bench_stream.py --ffn-epilogue`), off by default.

        Shapes are static (one graph per chunk shape and batch size; every block shares it), so the first chunks
        of a new shape pay the compile time. Output equals eager up to floating-point reassociation.

        Example::

            pipe.net.compile_blocks()                  # inductor (GPU); on CPU it needs a C++ compiler
            pipe.net.compile_blocks(backend="aot_eager")  # trace only, no code generation
        """
        if enabled:
            self._regions = _Regions.compiled(backend, mode, ffn_epilogue)
        else:
            self._regions = _Regions.eager(ffn_epilogue)

    def _head(self, x: torch.Tensor, temb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        b, frames, h, w = shape
        per_frame = (b, frames, h * w, x.shape[-1])
        shift, scale = (self.wan.scale_shift_table[:, None] + temb[:, :, None].float()).chunk(2, dim=2)
        x = (self.wan.norm_out(x.float()).view(per_frame) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = self.wan.proj_out(x)
        p_t, p_h, p_w = self.patch_size
        x = x.reshape(b, frames, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # -- the streaming pass

    def forward_chunk(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        text: TextKV,
        cache: RollingKVCache,
        first_frame: int,
        position_mode: str = "absolute",
        backend: str = "sdpa",
        **attn_kwargs,
    ) -> torch.Tensor:
        """Flow prediction for one chunk ``x [B, C, F, h, w]`` at ``timestep`` (scalar, ``[B]`` or ``[B, F]``).

        The chunk attends to every frame the cache keeps and to all of its own tokens; its K/V go to the cache's
        scratch region, and :meth:`RollingKVCache.commit` keeps them once the caller is done with the chunk.
        """
        return self.forward_streams(x, timestep, [text], [cache], [first_frame], position_mode, backend, **attn_kwargs)

    def forward_streams(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        texts: list[TextKV],
        caches: list[RollingKVCache],
        first_frames: list[int],
        position_mode: str = "absolute",
        backend: str = "sdpa",
        **attn_kwargs,
    ) -> torch.Tensor:
        """:meth:`forward_chunk` for the chunks of several streams in one forward (sessions sharing a forward).

        The rows of ``x`` belong to the streams in order, ``caches[i].batch`` rows to stream ``i``, whose prompt
        K/V are ``texts[i]`` (the same rows) and whose chunk starts at its frame ``first_frames[i]``. The linear
        layers run on all rows at once; self-attention runs per stream, against that stream's own cache (its own
        kept frames, fill state and positions), so each stream gets what :meth:`forward_chunk` would give it alone.

        Example::

            flow = net.forward_streams(torch.cat([xa, xb]), t, [text_a, text_b], [cache_a, cache_b], [12, 3])
        """
        b, _, frames, lh, lw = x.shape
        if not len(texts) == len(caches) == len(first_frames) >= 1:
            raise ValueError(
                f"give one text, cache and first frame per stream; got {len(texts)}, {len(caches)}, {len(first_frames)}"
            )
        rows = [b] if len(caches) == 1 else [cache.batch for cache in caches]
        if sum(rows) != b:
            raise ValueError(f"latents have {b} rows but the caches hold {rows} (one row per cache batch entry)")
        if len(caches) > 1 and attn_kwargs:
            raise ValueError(f"per-stream attention state {sorted(attn_kwargs)} cannot be shared by several streams")
        grid = self.grid(lh, lw)
        tokens_per_frame = grid[0] * grid[1]
        for cache in caches:
            if cache.layout.frame_tokens != tokens_per_frame:
                raise ValueError(
                    f"cache was built for {cache.layout.frame_tokens} tokens per frame, latents give {tokens_per_frame}"
                )
        ropes = self.stream_ropes(caches, first_frames, frames // self.patch_size[0], grid, position_mode)
        return self.forward_prepared(x, timestep, texts, caches, ropes, backend, **attn_kwargs)

    def stream_ropes(
        self,
        caches: list[RollingKVCache],
        first_frames: list[int],
        frames: int,
        grid: tuple[int, int],
        position_mode: str = "absolute",
    ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]]:
        """RoPE tables of each stream's chunk: ``((q_cos, q_sin), k_rope)`` per stream, where ``k_rope`` covers the
        kept frames plus the chunk in bounded mode (cached keys are stored unrotated) and is None otherwise."""
        ropes = []
        for cache, first_frame in zip(caches, first_frames, strict=True):
            q_pos = cache.chunk_positions(first_frame, frames, position_mode)
            # Bounded mode stores cached keys unrotated: their positions change as the window slides.
            k_rope = self._rope(cache.slot_positions("bounded") + q_pos, grid) if position_mode == "bounded" else None
            ropes.append((self._rope(q_pos, grid), k_rope))
        return ropes

    def forward_prepared(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        texts: list[TextKV],
        caches: list[RollingKVCache],
        ropes: list,
        backend: str = "sdpa",
        **attn_kwargs,
    ) -> torch.Tensor:
        """:meth:`forward_streams` with the RoPE tables given (:meth:`stream_ropes`) and no input checks: with a
        timestep tensor, every input is a device tensor, which is what a CUDA graph of the pass replays
        (:mod:`~stream_runtime.pipelines.wan.graphs`)."""
        b, _, frames, lh, lw = x.shape
        rows = [b] if len(caches) == 1 else [cache.batch for cache in caches]
        grid = self.grid(lh, lw)
        temb, mod = self._time(timestep, b, frames)
        h = self._embed(x)
        text = (
            texts[0]
            if len(texts) == 1
            else [tuple(torch.cat(kv) for kv in zip(*per, strict=True)) for per in zip(*texts, strict=True)]
        )

        for i, block in enumerate(self.wan.blocks):

            def self_attn(q, k, v, layer=i):
                out = []
                parts = zip(q.split(rows), k.split(rows), v.split(rows), caches, ropes, strict=True)
                for q_s, k_s, v_s, cache, (q_rope, k_rope) in parts:
                    q_s = self._apply_rope(q_s, *q_rope)
                    if k_rope is None:
                        k_all, v_all = cache.store_current(layer, self._apply_rope(k_s, *q_rope), v_s)
                    else:
                        k_all, v_all = cache.store_current(layer, k_s, v_s)
                        k_all = self._apply_rope(k_all, *k_rope)
                    out.append(
                        attention(
                            q_s, k_all, v_all, backend=backend, layer=layer, cache=cache, frame_grid=grid, **attn_kwargs
                        )
                    )
                return out[0] if len(out) == 1 else torch.cat(out)

            h = self._block(block, h, frames, mod, text[i], self_attn)
        return self._head(h, temb, (b, frames, *grid))

    # -- the stream-batch pass: chunks at different passes in one forward, split into stage-sized pieces

    def batch_conditioning(
        self,
        timesteps: torch.Tensor,
        first_frames: list[int],
        frames: int,
        grid: tuple[int, int],
        cache: RollingKVCache,
        position_mode: str = "absolute",
    ) -> BatchConditioning:
        """Conditioning of a batch of ``B = len(first_frames)`` chunks at ``timesteps [B]`` (or ``[B, F]``) whose
        first latent frames are ``first_frames``; ``cache`` supplies the kept frames' positions (bounded mode)."""
        b = len(first_frames)
        temb, mod = self._time(timesteps, b, frames)
        if position_mode == "bounded":
            # Every chunk follows the same kept frames, so all share one set of positions.
            q_pos = cache.chunk_positions(0, frames, "bounded")
            q_cos, q_sin = self._rope(q_pos, grid)
            k_cos, k_sin = self._rope(cache.slot_positions("bounded") + q_pos, grid)
            return BatchConditioning(frames, grid, temb, mod, q_cos, q_sin, k_cos, k_sin)
        ropes = [self._rope(cache.chunk_positions(f, frames, "absolute"), grid) for f in first_frames]
        q_cos, q_sin = (torch.stack(t) for t in zip(*ropes, strict=True))
        return BatchConditioning(frames, grid, temb, mod, q_cos, q_sin)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, F*h*w, dim]`` of latents ``x [B, C, F, h, w]`` (the first stage's job)."""
        return self._embed(x)

    def run_blocks(
        self,
        h: torch.Tensor,
        cond: BatchConditioning,
        text: TextKV,
        cache: RollingKVCache,
        layers: range | None = None,
        commit_item: int | None = None,
        backend: str = "sdpa",
        **attn_kwargs,
    ) -> torch.Tensor:
        """Blocks ``layers`` (default: all) over a stream batch ``h [B, F*h*w, dim]``.

        Each chunk attends to the kept frames of ``cache`` (one view shared by the batch) and to its own tokens,
        never to the other chunks. The K/V of chunk ``commit_item`` go to the cache's scratch region, so that
        :meth:`RollingKVCache.commit` after the forward keeps them; the cache is otherwise unchanged.
        """
        b = h.shape[0]
        bounded = cond.k_cos is not None
        for i in range(self.num_layers) if layers is None else layers:

            def self_attn(q, k, v, layer=i):
                q = self._apply_rope(q, cond.q_cos, cond.q_sin)
                if not bounded:
                    k = self._apply_rope(k, cond.q_cos, cond.q_sin)
                if commit_item is not None:
                    cache.store_current(layer, k[commit_item : commit_item + 1], v[commit_item : commit_item + 1])
                kept_k, kept_v = cache.kept(layer)
                # The kept frames are shared: a broadcast view, copied once into the concatenation.
                k_all = torch.cat([kept_k.expand(b, -1, -1, -1).to(k.dtype), k], dim=1)
                v_all = torch.cat([kept_v.expand(b, -1, -1, -1).to(v.dtype), v], dim=1)
                if bounded:
                    k_all = self._apply_rope(k_all, cond.k_cos, cond.k_sin)
                return attention(
                    q, k_all, v_all, backend=backend, layer=layer, cache=cache, frame_grid=cond.grid, **attn_kwargs
                )

            text_k, text_v = text[i]
            text_i = (text_k.expand(b, -1, -1, -1), text_v.expand(b, -1, -1, -1))
            h = self._block(self.wan.blocks[i], h, cond.frames, cond.mod, text_i, self_attn)
        return h

    def head(self, h: torch.Tensor, cond: BatchConditioning) -> torch.Tensor:
        """Flow prediction ``[B, C, F, h, w]`` from the last block's output (the last stage's job)."""
        return self._head(h, cond.temb, (h.shape[0], cond.frames, *cond.grid))

    def forward_batch(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        first_frames: list[int],
        text: TextKV,
        cache: RollingKVCache,
        commit_item: int | None = None,
        position_mode: str = "absolute",
        backend: str = "sdpa",
        **attn_kwargs,
    ) -> torch.Tensor:
        """Flow prediction for a stream batch ``x [B, C, F, h, w]``: chunk ``b`` at ``timesteps[b]`` starting at
        stream frame ``first_frames[b]``; see :meth:`run_blocks` for what each chunk attends to and
        :mod:`stream_runtime.stream_batch` for the schedule.

        Example::

            flow = net.forward_batch(x, torch.tensor([t0, t1]), [6, 3], text, cache, commit_item=1)
            cache.commit(3, 3, latents=x0_of_item_1)
        """
        if len(first_frames) != x.shape[0]:
            raise ValueError(f"first_frames must give one frame per chunk ({x.shape[0]}), got {len(first_frames)}")
        grid = self.grid(*x.shape[3:])
        if cache.layout.frame_tokens != grid[0] * grid[1]:
            raise ValueError(
                f"cache was built for {cache.layout.frame_tokens} tokens per frame, latents give {grid[0] * grid[1]}"
            )
        frames = x.shape[2] // self.patch_size[0]
        cond = self.batch_conditioning(timesteps, first_frames, frames, grid, cache, position_mode)
        h = self.run_blocks(self.embed(x), cond, text, cache, None, commit_item, backend, **attn_kwargs)
        return self.head(h, cond)

    # -- the full-sequence pass (reference and training)

    def forward_full(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        text: TextKV,
        frame_mask: torch.Tensor | None = None,
        frame_positions: torch.Tensor | list[int] | None = None,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """Flow prediction for a whole sequence ``x [B, C, T, h, w]`` with per-frame ``timestep [B, T]``.

        ``frame_mask [T, T]`` (bool, True = query frame may attend to key frame; None = full attention) is
        expanded to tokens; see :func:`block_causal_mask`. ``frame_positions`` are the RoPE frame indices
        (default ``0..T-1``).
        """
        b, _, frames, lh, lw = x.shape
        grid = self.grid(lh, lw)
        temb, mod = self._time(timestep, b, frames)
        h = self._embed(x)
        positions = range(frames) if frame_positions is None else frame_positions
        cos, sin = rope_cos_sin(positions, grid, self.head_dim, device=self.device)
        mask = None
        if frame_mask is not None:
            n = grid[0] * grid[1]
            mask = frame_mask.to(self.device).repeat_interleave(n, 0).repeat_interleave(n, 1)

        def self_attn(q, k, v):
            return attention(
                self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin), v, backend=backend, mask=mask
            )

        for i, block in enumerate(self.wan.blocks):
            h = self._block(block, h, frames, mod, text[i], self_attn)
        return self._head(h, temb, (b, frames, *grid))


def _modulated(norm, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, per_frame: tuple) -> torch.Tensor:
    b, length, dim = h.shape
    return (norm(h.float()).view(per_frame) * (1 + scale) + shift).view(b, length, dim).type_as(h)


def _gated(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, per_frame: tuple) -> torch.Tensor:
    b, length, dim = h.shape
    return (h.float() + (y.float().view(per_frame) * gate).view(b, length, dim)).type_as(h)


def _modulation(block, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """shift, scale, gate, c_shift, c_scale, c_gate ``[B, F, 1, dim]`` (fp32) of one block."""
    return (block.scale_shift_table[:, None] + mod.float()).chunk(6, 2)


def block_pre_attention(block, x: torch.Tensor, frames: int, mod: torch.Tensor, heads: int):
    """Self-attention inputs ``q, k, v [B, L, H, D]`` of one Wan block (modulated norm, projections, QK norms)."""
    b, length, dim = x.shape
    per_frame = (b, frames, length // frames, dim)
    shift, scale, *_ = _modulation(block, mod)
    attn = block.attn1
    h = _modulated(block.norm1, x, scale, shift, per_frame)
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(h).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    return _heads(attn.norm_q(q), heads), _heads(attn.norm_k(k), heads), _heads(v, heads)


def ffn_forward(ffn, h: torch.Tensor, epilogue: bool = False) -> torch.Tensor:
    """Wan's feed-forward (linear, tanh-GELU, linear) on ``h [B, L, dim]``.

    ``epilogue``: on CUDA, the GELU runs inside the first matmul's epilogue (``torch._addmm_activation(...,
    use_gelu=True)``, cuBLASLt's tanh-GELU), so the ``[L, ffn_dim]`` intermediate is written once and never re-read
    by a separate GELU kernel (`bench/probe_ffn_gelu.py`). Elsewhere, or for another activation, the module as is
    (PyTorch's CPU ``_addmm_activation`` computes the exact GELU, not Wan's tanh form)."""
    up, down = ffn.net[0], ffn.net[2]
    if not (epilogue and h.is_cuda and getattr(up, "approximate", None) == "tanh" and up.proj.bias is not None):
        return ffn(h)
    hidden = torch._addmm_activation(up.proj.bias, h.flatten(0, -2), up.proj.weight.t(), use_gelu=True)
    return F.linear(hidden, down.weight, down.bias).view(*h.shape[:-1], -1)


def block_post_attention(
    block,
    x: torch.Tensor,
    y: torch.Tensor,
    frames: int,
    mod: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    ffn_epilogue: bool = False,
) -> torch.Tensor:
    """The rest of one Wan block after self-attention ``y [B, L, H, D]``: gated residual, cross-attention to the
    prompt K/V ``[B, Lt, H, D]``, modulated feed-forward (``ffn_epilogue``: see :func:`ffn_forward`)."""
    b, length, dim = x.shape
    per_frame = (b, frames, length // frames, dim)
    _, _, gate, c_shift, c_scale, c_gate = _modulation(block, mod)
    attn = block.attn1
    x = _gated(x, attn.to_out[0](y.flatten(2, 3).type_as(x)), gate, per_frame)
    # cross-attention to the prompt
    attn = block.attn2
    h = block.norm2(x.float()).type_as(x)
    q = _heads(attn.norm_q(attn.to_q(h)), text_k.shape[2])
    y = attention(q, text_k, text_v, backend="sdpa").flatten(2, 3).type_as(q)
    x = x + attn.to_out[0](y)
    # feed-forward
    h = _modulated(block.norm3, x, c_scale, c_shift, per_frame)
    return _gated(x, ffn_forward(block.ffn, h, ffn_epilogue), c_gate, per_frame)


class _Regions:
    """The functions a block calls around attention: eager, or ``torch.compile``d ones."""

    def __init__(self, pre=block_pre_attention, post=block_post_attention, rope=apply_rope) -> None:
        self.pre, self.post, self.rope = pre, post, rope

    @classmethod
    def eager(cls, ffn_epilogue: bool = False) -> _Regions:
        post = functools.partial(block_post_attention, ffn_epilogue=True) if ffn_epilogue else block_post_attention
        return cls(post=post)

    @classmethod
    def compiled(cls, backend, mode: str | None, ffn_epilogue: bool = False) -> _Regions:
        # 30-40 blocks share each graph; the limit only has to cover the distinct chunk shapes and batch sizes.
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        wrap = lambda fn: torch.compile(fn, backend=backend, mode=mode, dynamic=False)  # noqa: E731
        post = functools.partial(block_post_attention, ffn_epilogue=True) if ffn_epilogue else block_post_attention
        return cls(wrap(block_pre_attention), wrap(post), wrap(apply_rope))


def block_causal_mask(
    num_frames: int,
    chunk_frames: int,
    sink_frames: int | None = None,
    window_frames: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Frame-level mask ``[T, T]`` (True = attend): a frame sees every frame of its own chunk and of earlier chunks.

    With ``window_frames`` set, a chunk sees only the first ``sink_frames`` frames plus the most recent
    ``window_frames`` frames counted back from the end of its own chunk, which is what the rolling cache keeps.
    """
    chunk = torch.arange(num_frames, device=device) // chunk_frames
    mask = chunk[None, :] <= chunk[:, None]
    if window_frames is not None:
        frame = torch.arange(num_frames, device=device)
        chunk_end = (chunk + 1) * chunk_frames  # exclusive end of each query frame's chunk
        recent = frame[None, :] >= (chunk_end[:, None] - window_frames)
        sink = frame[None, :] < (sink_frames or 0)
        mask = mask & (recent | sink)
    return mask
