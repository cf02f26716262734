"""The GPU session's benchmark scripts run end to end on tiny CPU configs (figures not checked): GPU time is
scarce, so a script that breaks should break here first."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(tmp_path, *args):
    command = [sys.executable, *args, "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("extra", [[], ["--decode-ahead", "--early-first-frame"]], ids=["plain", "ahead_early"])
def test_bench_stream_tiny(tmp_path, extra):
    run(tmp_path, "bench/bench_stream.py", "--tiny", *extra)
    (result,) = tmp_path.glob("stream_tiny_*.json")
    report = json.loads(result.read_text())
    assert [r["config"] for r in report["rows"]] == ["t2v", "v2v"]
    assert report["meta"]["decode_ahead"] == bool(extra) and report["meta"]["early_first_frame"] == bool(extra)
    assert all(r["e2e_fps"] > 0 and r["ttff_s"] > 0 for r in report["rows"])


def test_bench_pacing_random_tiny(tmp_path):
    run(tmp_path, "bench/bench_pacing.py", "--model", "random-tiny", "--seconds", "1", "--threads", "1")
    (result,) = tmp_path.glob("pacing_cpu_*.json")
    row = json.loads(result.read_text())["row"]
    assert row["frames"] == 16 and row["interval_p50_ms"] > 0


def test_bench_tinyworld_cpu_compares_default_paths(tmp_path):
    args = ["--prompts", "1", "--seconds", "0.5", "--threads", "1", "--compare-defaults"]
    run(tmp_path, "bench/bench_tinyworld_cpu.py", *args)
    (result,) = tmp_path.glob("tinyworld_cpu_*.json")
    report = json.loads(result.read_text())
    assert [r["cpu_paths"] for r in report["runs"]] == ["pipeline", "default: conv3d norm rope"]
    assert report["weights"] == "trained" and report["defaults_fps_end_to_end_median"] > 0


def test_bench_latent_decoder_variants(tmp_path):
    """The channels-last variant (the full-size Wan VAE at 32x32: slow to build, so only this one)."""
    args = ["--sizes", "32x32", "--decoders", "vae_channels_last", "--latent-frames", "4", "--warmup", "1"]
    run(tmp_path, "bench/bench_latent_decoder.py", *args, "--repeats", "1")
    (result,) = tmp_path.glob("latent_decoder_*.json")
    assert [r["decoder"] for r in json.loads(result.read_text())["rows"]] == ["vae_channels_last"]


def test_peer_memory_runs_a_script_and_appends_its_peak(tmp_path):
    """The wrapper runs the peer script with its arguments (here a stand-in that writes one figure and exits 0,
    as the peer does with --skip-vae) and appends the peak-memory line to the same --out file."""
    peer = tmp_path / "peer.py"
    peer.write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "open(out, 'a').write(json.dumps({'figure': 'x', 'argv': sys.argv[1:]}) + '\\n')\n"
        "raise SystemExit(0)\n"
    )
    out = tmp_path / "peer.jsonl"
    done = subprocess.run(
        [sys.executable, "bench/peer_memory.py", str(peer), "--skip-vae", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"figure": "x", "argv": ["--skip-vae", "--out", str(out)]}
    assert lines[1]["figure"] == "peer_peak_mem_gib"  # value: None without CUDA


def test_probe_memory_tiny(tmp_path):
    run(tmp_path, "bench/probe_memory.py", "--tiny")
    (result,) = tmp_path.glob("memory_tiny_*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["config"] for r in rows] == ["t2v", "v2v"]
    assert all(r["kv_cache_gib"] > 0 and r["decoder_conv_cache_gib"] > 0 for r in rows)
    assert rows[0]["encoder_conv_cache_gib"] == 0 < rows[1]["encoder_conv_cache_gib"]


def test_probe_ffn_gelu_tiny(tmp_path):
    run(tmp_path, "bench/probe_ffn_gelu.py", "--tiny")
    (result,) = tmp_path.glob("ffn_gelu_tiny_*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager", "compiled", "epilogue", "epilogue_compiled"]
    assert rows[1]["max_abs_err_vs_fp32"] < 1e-4  # the epilogue's exact GELU on the CPU differs more; not checked
