"""Tiny-world training code on CPU at tiny shapes: each stage overfits a fixed batch, and the stages chain into a
folder that ``StreamPipeline.from_pretrained`` streams from."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from stream_runtime import StreamConfig, StreamPipeline
from stream_runtime.cache import CacheLayout, RollingKVCache
from stream_runtime.pipelines.tinyworld import eval_model, export, model, shape_probe, train_data, train_dit, train_vae
from stream_runtime.pipelines.tinyworld.spec import SHAPES
from stream_runtime.pipelines.tinyworld.train_data import ClipDataset, pool_batch, render_pool
from stream_runtime.pipelines.tinyworld.world import caption, sample_spec
from stream_runtime.pipelines.wan import sampling
from stream_runtime.pipelines.wan.transformer import StreamingWanTransformer

SIZE = 32  # smallest square the transformer's 16-pixel patches tile twice
TINY_VAE = dict(base_dim=4, z_dim=4)
TINY_DIT = dict(layers=1, heads=2, head_dim=8, text_dim=16, text_layers=1)
STEPS = 6


def short_run(out, first_vae, steps: int = 2, **options) -> dict:
    """The log of a ``steps``-step ``train_dit`` run on two tiny streams (batch 2, logging every step)."""
    config = dict(steps=steps, batch=2, size=SIZE, clips=2, latent_frames=6, log_every=1, **TINY_DIT)
    return train_dit.train(train_dit.DiTTrainConfig(vae=str(first_vae), out=str(out), **{**config, **options}))


def overfit(loss_fn, params, lr: float, steps: int = STEPS) -> list[float]:
    """Adam steps on one fixed batch (and fixed noise): the losses."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_vae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    data = ClipDataset(frames=5, size=16, seed=0)  # the VAE alone takes any multiple of 8
    pixels = torch.stack([data.clip(0), data.clip(1)])

    def loss_fn():
        return train_vae.vae_loss(vae, pixels, kl_weight=1e-4, generator=torch.Generator().manual_seed(0))[0]

    losses = overfit(loss_fn, vae.parameters(), lr=3e-3)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_pool_batches_are_the_datasets_clips():
    data = ClipDataset(frames=5, size=16, seed=3)
    pool = render_pool(data, 10, workers=0, group=4)  # groups of 4: the last one is short
    assert pool.dtype == torch.uint8 and pool.shape == (10, 5, 16, 16, 3)
    batch = pool_batch(pool, 6, torch.Generator().manual_seed(0))
    rows = torch.randint(10, (6,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch, torch.stack([data.clip(int(r)) for r in rows]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "objective,extra",
    [("teacher", {}), ("diffusion", {}), ("teacher", {"self_context_prob": 1.0}), ("teacher", {"patch": 1})],
)
def test_dit_loss_decreases_on_a_fixed_batch(objective, extra):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    stream = model.STREAM
    frames = model.stream_sequence_frames(stream)
    x0 = torch.randn(2, vae.config.z_dim, frames, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    captions = [caption(sample_spec(seed)) for seed in (200, 201)]
    cfg = train_dit.DiTTrainConfig(vae="", out="", objective=objective, **TINY_DIT, **extra)
    tokenizer = model.build_tokenizer()
    wan, text_encoder = train_dit.build_models(cfg, vae, len(tokenizer))
    assert tuple(wan.config.patch_size) == (1, cfg.patch or 2, cfg.patch or 2)
    net = StreamingWanTransformer(wan)
    ids, mask = model.tokenize(tokenizer, captions)
    grid = torch.tensor([0.9, 0.5])

    def loss_fn():
        text_kv = net.text_kv(model.encode_tokens(text_encoder, ids, mask))
        generator = torch.Generator().manual_seed(0)  # same noise every step: an overfit check
        return train_dit.flow_loss(net, x0, text_kv, cfg, stream, grid, generator)[0]

    losses = overfit(loss_fn, [*wan.parameters(), *text_encoder.parameters()], lr=1e-2)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]


def test_teacher_forcing_mask_matches_the_stream_view():
    stream = StreamConfig(chunk_frames=1, sink_frames=1, window_frames=2)
    mask = train_dit.teacher_forcing_mask(4, stream)
    context, noisy_to_context, noisy_to_noisy = mask[:4, :4], mask[4:, :4], mask[4:, 4:]
    assert not mask[:4, 4:].any()  # context never sees noisy frames
    # noisy frame 3 sees the sink (0) and the one window frame before it (2), not 1, and not itself clean
    assert noisy_to_context[3].tolist() == [True, False, True, False]
    assert noisy_to_noisy.equal(torch.eye(4, dtype=torch.bool))
    assert context[3].tolist() == [True, False, True, True]


def test_sequences_start_with_the_sinks_and_keep_the_window_contiguous():
    stream = StreamConfig(chunk_frames=2, sink_frames=2, window_frames=4)
    frames = train_dit.sequence_frames(64, stream, 12, 0.3, torch.Generator().manual_seed(0))
    assert frames.shape == (64, 6)
    assert (frames[:, :2] == torch.tensor([0, 1])).all()
    assert (frames[:, 3:] - frames[:, 2:-1] == 1).all()
    starts = frames[:, 2]
    assert ((starts % 2 == 0) & (starts >= 2) & (starts <= 8)).all()


def test_tokenizer_knows_every_caption_word():
    tokenizer = model.build_tokenizer()
    captions = [caption(sample_spec(seed)) for seed in range(200)]
    ids, _ = model.tokenize(tokenizer, captions)  # raises on an unknown word
    assert ids.shape[1] == model.max_text_tokens()


def test_stages_chain_into_a_streamable_folder(tmp_path):
    vae_dir, dit_dir, out = tmp_path / "vae", tmp_path / "dit", tmp_path / "tinyworld"
    vae_log = train_vae.train(
        train_vae.VAETrainConfig(
            out=str(vae_dir), steps=2, batch=2, frames=5, size=SIZE, stats_clips=2, eval_clips=0, **TINY_VAE
        )
    )
    assert vae_log["steps"] == 2 and len(vae_log["latents_std"]) == TINY_VAE["z_dim"]
    dit_log = train_dit.train(
        train_dit.DiTTrainConfig(
            vae=str(vae_dir), out=str(dit_dir), steps=2, batch=2, size=SIZE, clips=2, latent_frames=6, **TINY_DIT
        )
    )
    assert dit_log["steps"] == 2 and np.isfinite(dit_log["first_loss"])
    more = train_dit.train(  # a chained run continues from the first one's weights
        train_dit.DiTTrainConfig(
            vae=str(vae_dir),
            out=str(tmp_path / "dit2"),
            init=str(dit_dir),
            steps=1,
            batch=2,
            size=SIZE,
            clips=2,
            latent_frames=6,
            **TINY_DIT,
        )
    )
    assert np.isfinite(more["first_loss"])
    summary = export.export(str(vae_dir), str(dit_dir), str(out))
    assert summary["megabytes"] < export.MAX_MB
    assert train_dit.load_trained_for(out) == train_dit.load_trained_for(dit_dir)  # --init from an exported model

    pipe = StreamPipeline.from_pretrained(out)
    assert pipe.default_resolution == (SIZE, SIZE)
    assert pipe.stream_config() == model.STREAM
    assert pipe.stream_config("v2v") == model.STREAM.replace(strength=model.V2V_STRENGTH)  # the trained layout
    with pipe.session("a small red circle moving up-left on a grey top and navy bottom background", seed=0) as s:
        first, second = next(s), next(s)
    assert first.shape == (1, SIZE, SIZE, 3) and second.shape == (4, SIZE, SIZE, 3)
    assert first.dtype == np.uint8
    with pytest.raises(ValueError, match="purple"):
        pipe.session("a small purple circle moving left on a black background")

    report = eval_model.main(
        [
            "--model",
            str(out),
            "--prompts",
            "1",
            "--frames",
            "22",
            "--switch",
            "1",
            "--stability",
            "6",
            "--stability-prompts",
            "1",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    for key in ("colour_accuracy", "shape_accuracy", "motion_accuracy"):
        assert 0.0 <= report[key] <= 1.0 and 0.0 <= report["switch"][key] <= 1.0
    assert report["switch"]["settle_chunks"] == eval_model.SWITCH_SETTLE_CHUNKS
    assert report["stability"]["without_sink"]["sink_frames"] == 0
    assert (tmp_path / "eval.json").is_file()

    # A fine-tune of the exported model, with caption dropout, re-exported with guidance on: the VAE comes from the
    # exported folder and the earlier runs stay on record in training.json.
    tuned = train_dit.train(
        train_dit.DiTTrainConfig(
            vae=str(out / "vae"),
            out=str(tmp_path / "tuned"),
            init=str(out),
            steps=1,
            batch=2,
            size=SIZE,
            clips=2,
            latent_frames=6,
            uncond_prob=0.5,
            **TINY_DIT,
        )
    )
    assert tuned["config"]["uncond_prob"] == 0.5
    export.export(str(out / "vae"), str(tmp_path / "tuned"), str(tmp_path / "guided"), guidance_scale=2.5)
    guided = StreamPipeline.from_pretrained(tmp_path / "guided")
    assert guided.stream_config().guidance_scale == 2.5
    logs = json.loads((tmp_path / "guided" / train_dit.EXPORT_LOG_FILE).read_text())
    assert logs["vae"]["steps"] == 2 and logs["dit"]["steps"] == 1 and logs["earlier"]["dit"]["steps"] == 2
    with guided.session("a small red circle moving up-left on a grey background", seed=0) as s:
        assert s.cache.batch == 2 and next(s).shape == (1, SIZE, SIZE, 3)


def test_teacher_forcing_pass_equals_the_stream():
    """Each noisy chunk of the [context | noisy] training pass gets exactly the flow the stream computes for it
    from the cache (context passes at t=0, bounded positions), over a fresh stream of sink + window frames."""
    torch.manual_seed(0)
    stream = model.STREAM
    cfg = model.transformer_config(4, 16, layers=2, heads=2, head_dim=8)
    net = StreamingWanTransformer(WanTransformer3DModel(**cfg).eval())
    frames = model.stream_sequence_frames(stream)
    g = torch.Generator().manual_seed(1)
    clean, noisy = torch.randn(1, 4, frames, 4, 4, generator=g), torch.randn(1, 4, frames, 4, 4, generator=g)
    text = net.text_kv(torch.randn(1, 5, 16, generator=g))
    t = 600.0
    layout = CacheLayout(4, stream.sink_frames, stream.window_frames, stream.chunk_frames)
    cache = RollingKVCache(layout, net.num_layers, 1, net.heads, net.head_dim)
    streamed = []
    with torch.no_grad():
        for lo in range(0, frames, stream.chunk_frames):
            hi = lo + stream.chunk_frames
            streamed.append(net.forward_chunk(noisy[:, :, lo:hi], t, text, cache, lo, stream.position_mode))
            net.forward_chunk(clean[:, :, lo:hi], 0.0, text, cache, lo, stream.position_mode)
            cache.commit(lo, stream.chunk_frames)
        steps = torch.tensor([[0.0] * frames + [t] * frames])
        mask = train_dit.teacher_forcing_mask(frames, stream)
        full = net.forward_full(torch.cat([clean, noisy], 2), steps, text, mask, list(range(frames)) * 2)
    torch.testing.assert_close(torch.cat(streamed, 2), full[:, :, frames:], atol=1e-5, rtol=1e-5)


def test_readme_strip_script_draws_the_models_frames(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "tinyworld_strip.py"
    spec = importlib.util.spec_from_file_location("tinyworld_strip", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    pipe = StreamPipeline.tiny_random(seed=0)
    image = script.strip(pipe, ["a red fox", "a blue cat"], frames=9, every=4, scale=2)
    h, w = pipe.default_resolution
    assert image.shape == (2 * h * 2, 3 * w * 2, 3) and image.dtype == np.uint8
    with pipe.session("a red fox", seed=0) as s:  # row 1 is the stream's frames 0, 4, 8
        first = np.concatenate([next(s), next(s), next(s)])
    np.testing.assert_array_equal(image[: 2 * h : 2, : 2 * w : 2], first[0])


@pytest.fixture(scope="module")
def first_vae(tmp_path_factory):
    """A tiny VAE folder after one training step: the ``init`` of the decoder-only runs."""
    first = tmp_path_factory.mktemp("first") / "vae"
    train_vae.train(
        train_vae.VAETrainConfig(
            out=str(first), steps=1, batch=2, frames=5, size=SIZE, stats_clips=2, eval_clips=0, **TINY_VAE
        )
    )
    return first


def test_decoder_only_fine_tune_keeps_the_latent_space(tmp_path, first_vae):
    first = first_vae
    with pytest.raises(ValueError, match="needs init"):
        train_vae.train(train_vae.VAETrainConfig(out=str(tmp_path / "x"), steps=1, freeze_encoder=True))
    tuned = tmp_path / "tuned"
    log = train_vae.train(
        train_vae.VAETrainConfig(
            out=str(tuned), init=str(first), freeze_encoder=True, steps=2, batch=2, frames=5, size=SIZE,
            lr=1e-2, warmup=0, stats_clips=2, eval_clips=0,
        )
    )  # fmt: skip
    before, after = AutoencoderKLWan.from_pretrained(first), AutoencoderKLWan.from_pretrained(tuned)
    assert log["latents_mean"] == list(before.config.latents_mean)
    assert after.config.latents_std == before.config.latents_std
    for name in ("encoder", "quant_conv", "decoder"):
        same = all(
            torch.equal(a, b)
            for a, b in zip(getattr(before, name).parameters(), getattr(after, name).parameters(), strict=True)
        )
        assert same == (name != "decoder"), name


def test_edge_error_charges_blurred_corners_not_colour_offsets():
    square = torch.zeros(1, 3, 1, 16, 16)
    square[..., 4:12, 4:12] = 1.0
    assert train_vae.edge_error(square + 0.3, square).item() == pytest.approx(0.0, abs=1e-7)
    blurred = torch.nn.functional.avg_pool2d(square[:, :, 0], 3, stride=1, padding=1)[:, :, None]
    assert train_vae.edge_error(blurred, square).item() > 0.01
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    pixels = torch.rand(1, 3, 5, SIZE, SIZE) * 2 - 1
    plain, parts = train_vae.vae_loss(vae, pixels, 1e-4, torch.Generator().manual_seed(0))
    edged, edge_parts = train_vae.vae_loss(vae, pixels, 1e-4, torch.Generator().manual_seed(0), edge_weight=2.0)
    assert "edge" not in parts
    torch.testing.assert_close(edged, plain + 2.0 * edge_parts["edge"])


def test_a_wider_decoder_is_trained_behind_the_frozen_encoder(tmp_path, first_vae):
    first = first_vae
    with pytest.raises(ValueError, match="frozen encoder"):
        train_vae.train(train_vae.VAETrainConfig(out=str(tmp_path / "x"), init=str(first), decoder_base_dim=8))
    wide = tmp_path / "wide"
    train_vae.train(
        train_vae.VAETrainConfig(
            out=str(wide), init=str(first), freeze_encoder=True, decoder_base_dim=2 * TINY_VAE["base_dim"],
            steps=2, batch=2, frames=5, size=SIZE, lr=1e-2, warmup=0, stats_clips=2, eval_clips=0, edge_weight=1.0,
        )
    )  # fmt: skip
    before, after = AutoencoderKLWan.from_pretrained(first), AutoencoderKLWan.from_pretrained(wide)
    assert after.config.decoder_base_dim == 2 * TINY_VAE["base_dim"]
    assert after.config.latents_std == before.config.latents_std
    for name in ("encoder", "quant_conv"):  # post_quant_conv starts as a copy and trains with the decoder
        for a, b in zip(getattr(before, name).parameters(), getattr(after, name).parameters(), strict=True):
            assert torch.equal(a, b), name
    assert sum(p.numel() for p in after.decoder.parameters()) > 2 * sum(p.numel() for p in before.decoder.parameters())
    pixels = torch.rand(1, 3, 5, SIZE, SIZE) * 2 - 1
    z = after.encode(pixels).latent_dist.mode()
    assert after.decode(z).sample.shape == pixels.shape


def test_self_estimates_are_the_models_clean_estimates_of_the_data():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    cfg = train_dit.DiTTrainConfig(vae="", out="", **TINY_DIT)
    wan, text_encoder = train_dit.build_models(cfg, vae, len(model.build_tokenizer()))
    net = StreamingWanTransformer(wan)
    stream = model.STREAM
    frames = model.stream_sequence_frames(stream)
    x0 = torch.randn(2, vae.config.z_dim, frames, SIZE // 8, SIZE // 8)
    ids, mask = model.tokenize(model.build_tokenizer(), [caption(sample_spec(s)) for s in (5, 6)])
    text_kv = net.text_kv(model.encode_tokens(text_encoder, ids, mask))
    noiseless = train_dit.self_estimates(net, x0, text_kv, stream, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noiseless, x0)  # at level 0 the estimate is the input itself
    own = train_dit.self_estimates(net, x0, text_kv, stream, 0.6, torch.Generator().manual_seed(0))
    assert own.shape == x0.shape and torch.isfinite(own).all() and not torch.allclose(own, x0)


def test_repatch_starts_the_finer_model_near_the_coarse_one():
    """Patch 2 -> 1 (the shipped transformer): on latents that are flat over each 2x2 patch, the re-patched model's
    output averaged per 2x2 stays near the coarse model's, far nearer than a fresh patch-1 model's."""
    coarse = WanTransformer3DModel.from_pretrained(model.shipped_model_path() / "transformer").eval()
    fine = train_dit.repatch(coarse, 1).eval()
    assert tuple(fine.config.patch_size) == (1, 1, 1)
    fresh = WanTransformer3DModel(**{**{k: v for k, v in coarse.config.items() if not k.startswith("_")},
                                     "patch_size": (1, 1, 1)}).eval()  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4).repeat_interleave(2, 3).repeat_interleave(2, 4)
    t, text = torch.tensor([500.0]), torch.randn(1, 8, coarse.config.text_dim)
    with torch.no_grad():
        want = F.avg_pool3d(coarse(x, t, text, return_dict=False)[0], (1, 2, 2))
        errors = [
            (F.avg_pool3d(m(x, t, text, return_dict=False)[0], (1, 2, 2)) - want).abs().mean() for m in (fine, fresh)
        ]
    assert errors[0] < 0.2 * want.abs().mean() and errors[0] < 0.5 * errors[1]
    with pytest.raises(ValueError, match="only spatial patch"):
        train_dit.repatch(fine, 2)


def test_shape_siblings_change_every_shape_and_nothing_else(monkeypatch):
    spec = sample_spec(300, num_shapes=3)
    sibling = train_data.shapes_rotated(spec, 1)
    assert sibling.background == spec.background
    for a, b in zip(spec.shapes, sibling.shapes, strict=True):
        assert b.shape != a.shape and b == dataclasses.replace(a, shape=b.shape)
    assert train_data.shapes_rotated(spec, 3) == spec  # three shapes: a full turn
    words = [(x, y) for x, y in zip(caption(spec).split(), caption(sibling).split(), strict=True) if x != y]
    assert len(words) == 3 and all(x in SHAPES and y in SHAPES for x, y in words)
    # a sibling whose caption is held out is never trained on: the other rotation, or no sibling at all
    seed = 500
    first, second = (caption(train_data.shapes_rotated(sample_spec(seed), k)) for k in (1, 2))
    assert train_data.shape_sibling(seed) == 1
    monkeypatch.setattr(train_data, "held_out_captions", lambda: frozenset({first}))
    assert train_data.shape_sibling(seed) == 2
    monkeypatch.setattr(train_data, "held_out_captions", lambda: frozenset({first, second}))
    assert train_data.shape_sibling(seed) is None


def test_shape_pairs_share_their_noise_and_the_pair_term_is_their_difference():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    streams = train_data.encode_streams(vae, 4, 6, SIZE, batch=4, shape_pairs=True)
    assert streams.paired and streams.latents.shape[0] == 4
    assert streams.seeds[0] == streams.seeds[1] != streams.seeds[2] == streams.seeds[3]
    assert streams.captions[0] != streams.captions[1]
    assert not torch.equal(streams.latents[0], streams.latents[1])
    with pytest.raises(ValueError, match="even"):
        train_data.encode_streams(vae, 3, 6, SIZE, shape_pairs=True)

    cfg = train_dit.DiTTrainConfig(vae="", out="", pair_weight=2.0, **TINY_DIT)
    wan, text_encoder = train_dit.build_models(cfg, vae, len(model.build_tokenizer()))
    net = StreamingWanTransformer(wan)
    stream, grid = model.STREAM, torch.tensor([0.9, 0.5])
    frames = model.stream_sequence_frames(stream)
    x0 = torch.randn(2, vae.config.z_dim, frames, SIZE // 8, SIZE // 8)
    ids, mask = model.tokenize(model.build_tokenizer(), [caption(sample_spec(s)) for s in (5, 6)])
    embeds = model.encode_tokens(text_encoder, ids, mask)
    for objective in train_dit.OBJECTIVES:
        cfg = dataclasses.replace(cfg, objective=objective)
        # a "pair" of two equal rows: with shared noise and levels both halves predict alike, the term is 0
        same = net.text_kv(embeds[:1].expand(2, -1, -1))
        _, parts = train_dit.flow_loss(
            net, x0[:1].expand(2, -1, -1, -1, -1), same, cfg, stream, grid, torch.Generator().manual_seed(0), True
        )
        assert parts["pair"].item() < 1e-10 < parts["loss"].item()
        loss, parts = train_dit.flow_loss(
            net, x0, net.text_kv(embeds), cfg, stream, grid, torch.Generator().manual_seed(0), paired=True
        )
        assert parts["pair"].item() > 1e-4
        torch.testing.assert_close(loss, parts["loss"] + 2.0 * parts["pair"])
    with pytest.raises(ValueError, match="even batch"):
        train_dit.flow_loss(net, x0[:1], net.text_kv(embeds[:1]), cfg, stream, grid, torch.Generator(), True)


def test_a_paired_run_logs_its_pair_term(tmp_path, first_vae):
    log = short_run(tmp_path / "dit", first_vae, steps=2, pair_weight=1.0)
    assert log["steps"] == 2 and all(np.isfinite(h["pair_loss"]) for h in log["history"])
    with pytest.raises(ValueError, match="even batch"):
        train_dit.train(train_dit.DiTTrainConfig(vae=str(first_vae), out=str(tmp_path / "x"), batch=3, pair_weight=1))
    streams = train_data.LatentStreams(torch.zeros(2, 4, 6, 4, 4), ["", ""], [0, 1])
    with pytest.raises(ValueError, match="shape pairs"):
        train_dit.train(
            train_dit.DiTTrainConfig(vae=str(first_vae), out=str(tmp_path / "y"), batch=2, steps=1, pair_weight=1),
            streams=streams,
        )


def test_a_4x_vae_and_a_transformer_moved_onto_its_latents_stream(tmp_path):
    """``train_vae --spatial 4`` (16x16 latents at 64x64) and ``train_dit --init assets/tinyworld --fresh-io
    --patch 2``: the shipped blocks keep their 8x8-pixel tokens, the patch embedding and output projection start
    anew, and the exported folder streams at the native size."""
    vae_dir, dit_dir, out = tmp_path / "vae", tmp_path / "dit", tmp_path / "model"
    train_vae.train(
        train_vae.VAETrainConfig(
            out=str(vae_dir), steps=1, batch=2, frames=5, size=SIZE, stats_clips=2, eval_clips=0, spatial=4,
            **TINY_VAE,
        )
    )  # fmt: skip
    vae = AutoencoderKLWan.from_pretrained(vae_dir)
    assert vae.config.scale_factor_spatial == 4
    z = vae.encode(torch.zeros(1, 3, 5, SIZE, SIZE)).latent_dist.mode()
    assert z.shape[-2:] == (SIZE // 4, SIZE // 4) and z.shape[2] == 2

    shipped = model.shipped_model_path()
    coarse = WanTransformer3DModel.from_pretrained(shipped / "transformer")
    moved = train_dit.fresh_io(coarse, TINY_VAE["z_dim"], 2)
    assert tuple(moved.config.patch_size) == (1, 2, 2) and moved.config.in_channels == TINY_VAE["z_dim"]
    old, new = coarse.state_dict(), moved.state_dict()
    for name, value in new.items():
        if name.startswith(train_dit.FRESH_IO_PREFIXES):
            assert value.shape != old[name].shape or not torch.equal(value, old[name]), name
        else:
            assert torch.equal(value, old[name]), name
    with pytest.raises(ValueError, match="pass init"):
        train_dit.train(train_dit.DiTTrainConfig(vae=str(vae_dir), out=str(dit_dir), fresh_io=True))

    log = train_dit.train(
        train_dit.DiTTrainConfig(
            vae=str(vae_dir), out=str(dit_dir), init=str(shipped), fresh_io=True, patch=2, steps=1, batch=2,
            size=SIZE, clips=2, latent_frames=6,
        )
    )  # fmt: skip
    assert log["steps"] == 1 and np.isfinite(log["first_loss"])
    assert train_dit.parse_args(["--vae", "v", "--out", "o", "--fresh-io"]).fresh_io
    assert not train_dit.parse_args(["--vae", "v", "--out", "o"]).fresh_io
    export.export(str(vae_dir), str(dit_dir), str(out))
    pipe = StreamPipeline.from_pretrained(out)
    assert pipe.spatial_factor == 8 and pipe.default_resolution == (SIZE, SIZE)
    with pipe.session("a small red circle moving up on a grey background", seed=0) as s:
        assert next(s).shape == (1, SIZE, SIZE, 3) and next(s).shape == (4, SIZE, SIZE, 3)


def test_shape_probe_scores_predictions_by_the_siblings_difference(tmp_path):
    torch.manual_seed(0)
    target, sibling = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    torch.testing.assert_close(shape_probe.explained(target, sibling, target, sibling), torch.ones(4))
    same = torch.randn(2, 3, 4, 2, 2)
    torch.testing.assert_close(shape_probe.explained(same, same, target, sibling), torch.zeros(4))
    assert (shape_probe.explained(sibling, target, target, sibling) < -2).all()  # the difference backwards
    result = shape_probe.main(
        ["--model", str(model.shipped_model_path()), "--pairs", "2", "--levels", "1", "0.5", "--out",
         str(tmp_path / "probe.json")]
    )  # fmt: skip
    assert [r["level"] for r in result["levels"]] == [1.0, 0.5]
    assert all(len(r["per_frame"]) == result["frames"] and r["first_frame"] <= 1.0 for r in result["levels"])
    assert all(r["words_first_frame"] > 0 for r in result["levels"])
    assert json.loads((tmp_path / "probe.json").read_text())["pairs"] == 2
    # a model whose cross-attention adds nothing cannot be moved by the words
    deaf = tmp_path / "deaf"
    StreamPipeline.from_pretrained(model.shipped_model_path()).save_pretrained(deaf)
    wan = WanTransformer3DModel.from_pretrained(deaf / "transformer")
    with torch.no_grad():
        for block in wan.blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
    wan.save_pretrained(deaf / "transformer")
    result = shape_probe.probe(deaf, pairs=2, levels=(0.5,))
    assert result["levels"][0]["words_first_frame"] == 0.0
    colour = shape_probe.probe(model.shipped_model_path(), pairs=2, levels=(0.75,), attribute="colour")
    assert colour["attribute"] == "colour" and colour["levels"][0]["words_first_frame"] > 0.1
    spec = sample_spec(3)
    rotated = train_data.colours_rotated(spec, 1)
    assert [s.colour for s in rotated.shapes] != [s.colour for s in spec.shapes]
    assert [s.shape for s in rotated.shapes] == [s.shape for s in spec.shapes]
    with pytest.raises(ValueError, match="attribute"):
        shape_probe.probe(deaf, pairs=2, attribute="size")


def test_compiled_training_passes_match_eager(tmp_path, first_vae):
    """``train_dit --compile``: the loss and the gradients of the compiled block halves equal eager's (traced and
    run through AOTAutograd here; inductor's code generation of the forward is held by ``test_compile.py``, and
    compiling a backward with inductor costs minutes on this CPU)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    cfg = train_dit.DiTTrainConfig(vae="", out="", **TINY_DIT)
    tokenizer = model.build_tokenizer()
    wan, text_encoder = train_dit.build_models(cfg, vae, len(tokenizer))
    stream, grid = model.STREAM, torch.tensor([0.9, 0.5])
    frames = model.stream_sequence_frames(stream)
    x0 = torch.randn(2, vae.config.z_dim, frames, SIZE // 8, SIZE // 8)
    ids, mask = model.tokenize(tokenizer, [caption(sample_spec(s)) for s in (5, 6)])
    results = []
    for compiled in (False, True):
        net = StreamingWanTransformer(wan)
        if compiled:
            net.compile_blocks(backend="aot_eager")
        wan.zero_grad()
        text_kv = net.text_kv(model.encode_tokens(text_encoder, ids, mask).detach())
        loss, _ = train_dit.flow_loss(net, x0, text_kv, cfg, stream, grid, torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in wan.parameters()]))
    (eager, eager_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in fast_grads)
    log = train_dit.train(
        train_dit.DiTTrainConfig(
            vae=str(first_vae), out=str(tmp_path / "dit"), steps=2, batch=2, size=SIZE, clips=2, latent_frames=6,
            compile="aot_eager", **TINY_DIT,
        )
    )  # fmt: skip
    assert log["steps"] == 2 and log["config"]["compile"] == "aot_eager"
    assert train_dit.parse_args(["--vae", "v", "--out", "o", "--compile", "inductor"]).compile == "inductor"


def test_foreground_shares_count_shape_pixels_per_latent_cell():
    background = np.zeros((8, 8, 3), np.uint8)
    clip = np.zeros((9, 8, 8, 3), np.uint8)  # 1 + 4 x 2 frames -> 3 latent frames of 2x2 cells (spatial 4)
    clip[0, :4, :4] = 255  # the whole top-left cell in frame 0
    clip[3, 4:, 4:] = (0, 0, 200)  # bottom-right cell in one of latent frame 1's four frames
    clip[5:, 0, 4] = 255  # one pixel of the top-right cell in all of latent frame 2's frames
    clip[5:, 7, 0] = 10  # below the threshold: antialiasing noise, not a shape
    shares = train_data.foreground_shares(clip, background, spatial=4)
    expected = np.zeros((3, 2, 2), np.float32)
    expected[0, 0, 0] = 1.0
    expected[1, 1, 1] = 0.25
    expected[2, 0, 1] = 1 / 16
    np.testing.assert_allclose(shares, expected)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        train_data.foreground_shares(clip[:8], background, spatial=4)


def test_foreground_weighted_loss_weighs_cells_and_logs_the_plain_one(tmp_path, first_vae):
    torch.manual_seed(0)
    vae = AutoencoderKLWan.from_pretrained(first_vae)
    streams = train_data.encode_streams(vae, 2, 6, SIZE, batch=2, foreground=True)
    fg = streams.foreground
    assert fg.shape == (2, 1, *streams.latents.shape[2:]) and 0 < fg.float().mean() < 0.5
    assert fg.max() <= 1 and fg.min() >= 0
    cfg = train_dit.DiTTrainConfig(vae="", out="", fg_weight=4.0, **TINY_DIT)
    wan, text_encoder = train_dit.build_models(cfg, vae, len(model.build_tokenizer()))
    net = StreamingWanTransformer(wan)
    stream, grid = model.STREAM, torch.tensor([0.9, 0.5])
    frames = model.stream_sequence_frames(stream)
    x0 = torch.randn(2, vae.config.z_dim, frames, SIZE // 8, SIZE // 8)
    ids, mask = model.tokenize(model.build_tokenizer(), [caption(sample_spec(s)) for s in (5, 6)])
    text_kv = net.text_kv(model.encode_tokens(text_encoder, ids, mask))
    for objective in train_dit.OBJECTIVES:
        cfg = dataclasses.replace(cfg, objective=objective)

        def loss(weight, cfg=cfg):
            return train_dit.flow_loss(
                net, x0, text_kv, cfg, stream, grid, torch.Generator().manual_seed(0), cell_weight=weight
            )

        plain, _ = loss(None)
        uniform, parts = loss(torch.full((2, 1, frames, SIZE // 8, SIZE // 8), 3.0))
        torch.testing.assert_close(uniform, plain)  # a uniform weight is the plain loss
        torch.testing.assert_close(parts["plain"], plain)
        one_cell = torch.zeros(2, 1, frames, SIZE // 8, SIZE // 8)
        one_cell[:, :, -1, 0, 0] = 1.0  # all weight on one cell of the last (always learning) frame
        weighted, parts = loss(one_cell)
        torch.testing.assert_close(parts["plain"], plain)
        assert abs(weighted.item() - plain.item()) > 1e-4
    log = short_run(tmp_path / "dit", first_vae, steps=2, fg_weight=4.0)
    assert log["steps"] == 2 and all(np.isfinite(h["plain_loss"]) for h in log["history"])
    log = short_run(tmp_path / "sink", first_vae, steps=1, sink_weight=4.0)
    assert log["steps"] == 1 and np.isfinite(log["history"][0]["plain_loss"])
    with pytest.raises(ValueError, match="sink_weight"):
        train_dit.train(train_dit.DiTTrainConfig(vae=str(first_vae), out=str(tmp_path / "z"), sink_weight=0))
    with pytest.raises(ValueError, match="foreground shares"):
        train_dit.train(
            train_dit.DiTTrainConfig(vae=str(first_vae), out=str(tmp_path / "y"), batch=2, steps=1, fg_weight=1),
            streams=train_data.LatentStreams(torch.zeros(2, 4, 6, 4, 4), ["", ""], [0, 1]),
        )


def test_grown_blocks_start_as_the_identity(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    cfg = train_dit.DiTTrainConfig(vae="", out="", **TINY_DIT)
    wan, _ = train_dit.build_models(cfg, vae, len(model.build_tokenizer()))
    with torch.no_grad():  # a trained model's output projections are not zero
        for p in wan.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grown = train_dit.grow_blocks(wan.eval(), 2).eval()
    assert grown.config.num_layers == wan.config.num_layers + 2 == len(grown.blocks)
    frames = model.stream_sequence_frames(model.STREAM)
    x = torch.randn(1, vae.config.z_dim, frames, SIZE // 8, SIZE // 8)
    text = torch.randn(1, 6, TINY_DIT["text_dim"])
    t = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, text).sample, wan(x, t, text).sample, atol=1e-5, rtol=1e-5)
    assert train_dit.grow_blocks(wan, 0) is wan
    with pytest.raises(ValueError, match="grow_layers"):
        train_dit.train(train_dit.DiTTrainConfig(vae="", out=str(tmp_path), grow_layers=1))


def test_single_share_renders_one_object_scenes_first():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**model.vae_config(**TINY_VAE))
    streams = train_data.encode_streams(vae, 4, 2, SIZE, batch=4, single_share=0.5)
    counts = [len(sample_spec(s).shapes) for s in streams.seeds]
    assert counts[:2] == [1, 1] and len(set(streams.seeds)) == 4
    assert [c.count(" and a ") for c in streams.captions[:2]] == [0, 0]
    with pytest.raises(ValueError, match="single_share"):
        train_data.encode_streams(vae, 4, 2, SIZE, single_share=1.5)


def test_swapped_outlines_keep_the_flow_to_the_own_clean_frame(tmp_path, first_vae):
    """``swap_prob``: the sink frames of swapped pairs are noised from the sibling (only at levels >= the minimum),
    and every target still leads from its noisy input to the row's own clean frame: x_t - level * target = x0."""
    g = torch.Generator().manual_seed(0)
    b, frames = 4, model.stream_sequence_frames(model.STREAM)
    x0 = torch.randn(b, 4, frames, 2, 2, generator=g)
    noise = torch.randn(b // 2, 4, frames, 2, 2, generator=g).repeat(2, 1, 1, 1, 1)
    level = torch.tensor([0.9, 0.3]).repeat(2)[:, None, None, None, None].expand(b, 1, frames, 1, 1)
    x_t = sampling.add_noise(x0, noise, level)
    cfg = train_dit.DiTTrainConfig(vae="", out="", swap_prob=1.0, swap_min_level=0.5)
    got, target = train_dit.swap_outlines(x0, x_t, noise - x0, noise, level, cfg, model.STREAM, g)
    torch.testing.assert_close(got - level * target, x0, atol=1e-5, rtol=1e-5)
    sinks = model.STREAM.sink_frames
    sibling = torch.cat([x0[2:], x0[:2]])
    # rows 0 and 2 (level 0.9) swap their sink frames, rows 1 and 3 (level 0.3) keep them; later frames never swap
    torch.testing.assert_close(got[[0, 2], :, :sinks], sampling.add_noise(sibling, noise, level)[[0, 2], :, :sinks])
    torch.testing.assert_close(got[[1, 3]], x_t[[1, 3]])
    torch.testing.assert_close(got[:, :, sinks:], x_t[:, :, sinks:])
    log = short_run(tmp_path / "dit", first_vae, steps=2, swap_prob=0.5)
    assert log["steps"] == 2 and all(np.isfinite(h["loss"]) for h in log["history"])
    with pytest.raises(ValueError, match="swap_prob"):
        train_dit.train(train_dit.DiTTrainConfig(vae="", out=str(tmp_path / "x"), swap_prob=2.0))


def test_command_line_defaults_are_the_configs():
    """Every option of ``train_dit``'s command line defaults to the dataclass default (an int option that parsed
    to None once crashed a run), and the new options parse."""
    parsed = train_dit.parse_args(["--vae", "v", "--out", "o"])
    assert parsed == train_dit.DiTTrainConfig(vae="v", out="o")
    parsed = train_dit.parse_args(
        ["--vae", "v", "--out", "o", "--grow-layers", "3", "--swap-prob", "0.5", "--fg-weight", "4",
         "--sink-weight", "2", "--single-share", "0.25"]
    )  # fmt: skip
    assert (parsed.grow_layers, parsed.swap_prob, parsed.fg_weight, parsed.sink_weight, parsed.single_share) == (
        3, 0.5, 4.0, 2.0, 0.25,
    )  # fmt: skip
