"""The benchmark harness (flashdino.bench): FLOP formulas, timing statistics, device rates, backend forcing,
the CPU run end to end, peers that are not installed, the target evaluation and the benchmarks/ scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

import flashdino
from flashdino import bench
from flashdino.bench import backends, flops, report, timing
from flashdino.bench import compare_tokens, evaluate_targets, flop_breakdown, model_flops, tokens_per_image
from flashdino.bench.peers import fd_to_timm, res_for
from flashdino.bench.targets import fmt_target


def _tiny(ffn="mlp", **kw):
    return flashdino.get_config("dinov3_vits16", embed_dim=8, num_heads=2, depth=2, ffn=ffn, **kw)


# -- FLOPs --------------------------------------------------------------------------------------------------
def test_flops_hand_count_mlp():
    cfg = _tiny()  # D=8, MLP x4 (hidden 32), 4 storage tokens, patch 16
    # 32x32 image: 2x2 patches; N = 1 CLS + 4 storage + 4 patches = 9 tokens.
    N, D, H = 9, 8, 32
    assert tokens_per_image(cfg, 32) == N
    gemm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    qkv = gemm(N, D, 3 * D)
    proj = gemm(N, D, D)
    scores = gemm(N, D, N)  # q @ k^T over all heads: sum_h 2*N*N*d = 2*N*N*D
    context = gemm(N, N, D)  # attn @ v
    fc1, fc2 = gemm(N, D, H), gemm(N, H, D)
    block = qkv + proj + scores + context + fc1 + fc2
    assert block == 16416
    assert block == 24 * N * D**2 + 4 * N**2 * D  # the SPEC section 4 formula for MLP x4
    patch_embed = gemm(4, 3 * 16 * 16, D)  # 4 patches, each a 768-long row times [768, D]
    b = flop_breakdown(cfg, 32)
    assert b["block"] == block and b["blocks"] == 2 * block and b["patch_embed"] == patch_embed
    assert model_flops(cfg, 32) == 2 * block + patch_embed == 81984
    assert model_flops(cfg, 32, batch=3) == 3 * 81984
    assert model_flops(cfg, 32, batch=3, training=True) == 9 * 81984


def test_flops_hand_count_swiglu_and_rectangles():
    cfg = _tiny(ffn="swiglu", ffn_ratio=6.0)  # hidden = int(48 * 2/3) = 32, rounded up to 8 -> 32
    assert cfg.ffn_hidden == 32
    N, D, H = 1 + 4 + 2 * 3, 8, 32  # 32x48 image: 2x3 patches
    assert tokens_per_image(cfg, 32, 48) == N
    block = 2 * N * D * 3 * D + 2 * N * D * D + 4 * N * N * D + 3 * (2 * N * D * H)  # w1, w2, w3
    b = flop_breakdown(cfg, 32, 48)
    assert b["block"] == block
    # A remainder that is not a whole patch is dropped (DINOv3): 47 px -> 2 patches.
    assert tokens_per_image(cfg, 32, 47) == 1 + 4 + 2 * 2


def test_flops_match_torch_flop_counter():
    """Linear + conv FLOPs counted by torch equal the formula minus attention (not counted on a CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = flashdino.create_model("dinov3_vits16", depth=2).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(x)
    b = flop_breakdown(model.cfg, 64, 48)
    counted = counter.get_total_flops()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    attention = 2 * b["per_block"]["attention"] * model.cfg.depth
    if not any("attention" in k for k in counts):
        assert counted == model_flops(model.cfg, 64, 48, batch=2) - attention
    else:
        assert counted == model_flops(model.cfg, 64, 48, batch=2)


def test_compare_tokens():
    ref = torch.randn(2, 5, 8)
    same = compare_tokens(ref.clone(), ref)
    assert same["cos"] == pytest.approx(1.0) and same["rel_err"] == 0 and same["max_abs_rel"] == 0
    noisy = compare_tokens(ref + 0.01 * torch.randn_like(ref), ref)
    assert 0.99 < noisy["cos"] < 1 and 0 < noisy["rel_err"] < 0.05
    assert compare_tokens(ref[:, :4], ref)["ok"] is False


def test_device_rates_cpu():
    g = bench.measure_gemm_rate(torch.device("cpu"), torch.float32, n=64, repeats=1)
    assert g["n"] == 64 and g["flops_per_s"] > 0 and g["dtype"] == "float32"
    c = bench.measure_copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, repeats=1)
    assert c["bytes_per_s"] > 0


# -- the harness end to end ---------------------------------------------------------------------------------
_TINY_ARGS = ["--device", "cpu", "--models", "vits16", "--depth", "2", "--res", "32", "--batch", "2",
              "--train-batch", "1", "--dtypes", "fp32", "--repeats", "1", "--warmup", "0", "--rotate", "2",
              "--gemm-size", "64", "--name", "tiny", "--quiet"]


def test_harness_end_to_end_cpu(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    result = bench.main(_TINY_ARGS + ["--modes", "inference,latency,training",
                                      "--peers", "flashdino,flashdino-torch,hf,timm", "--out-dir", str(tmp_path)],
                        prog="flashdino bench")
    data = json.loads((tmp_path / "tiny.json").read_text())
    md = (tmp_path / "tiny.md").read_text()
    assert data["command"].startswith("flashdino bench --device cpu")
    env = data["environment"]
    for key in ("date_utc", "cpu", "machine", "platform", "loadavg_start", "loadavg_end", "torch_threads"):
        assert key in env
    for lib in ("torch", "triton", "transformers", "timm", "flashdino"):
        assert lib in env["versions"]
    for when in ("start", "end"):
        assert data["rates"][when]["fp32"]["flops_per_s"] > 0
        assert data["rates"][when]["bf16"]["flops_per_s"] > 0
        assert data["rates"][when]["copy"]["bytes_per_s"] > 0
    rows = {(r["mode"], r["peer"]): r for r in data["rows"]}
    for mode in ("inference", "latency", "training"):
        for peer in ("flashdino", "flashdino-torch", "hf", "timm"):
            r = rows[(mode, peer)]
            assert r["status"] == "ok", r
            assert r["time_s"] > 0 and r["imgs_per_s"] > 0 and r["mfu"] > 0
            assert r["batch"] == {"inference": 2, "latency": 1, "training": 1}[mode]
            assert r["flops"] == model_flops(flashdino.get_config("dinov3_vits16", depth=2), 32, batch=r["batch"],
                                             training=mode == "training")
            assert r["depth"] == 2 and r["res"] == 32 and r["tokens"] == 1 + 4 + 4
        assert set(rows[(mode, "flashdino")]["speedup"]) == {"hf", "timm"}
    for mode in ("inference", "latency"):
        for peer in ("hf", "timm"):
            check = rows[(mode, peer)]["check"]
            # Same weights; only the RoPE periods differ (fp32 in HF / timm, bf16-rounded in flashdino).
            assert check["cos"] > 0.9999 and check["rel_err"] < 1e-2, check
        assert rows[(mode, "flashdino")]["check"]["rel_err"] < 1e-5  # CPU: the same PyTorch path
    assert "check" not in rows[("training", "hf")]
    # Targets are for full-depth models: reported as n/a for this depth-2 run.
    assert data["targets"] and all(t["status"] == "n/a" for t in data["targets"])
    for text in ("| model | res | batch | dtype | peer |", "## inference", "## latency", "## training",
                 "## targets", "load average", "command", "transformers"):
        assert text in md
    assert result["rows"] == data["rows"] or len(result["rows"]) == len(data["rows"])


def test_missing_peers_are_skipped(tmp_path, monkeypatch, capsys):
    # Importing a module whose sys.modules entry is None raises ImportError: "not installed".
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    argv = [a for a in _TINY_ARGS if a != "--quiet"]
    result = bench.main(argv + ["--modes", "inference,memory", "--peers", "flashdino,hf,hf-compile,timm,flashdino-graphs",
                                "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for peer in ("hf", "hf-compile", "timm"):
        assert "not installed" in result["skipped"][peer]
        assert f"skipping peer {peer}" in out
    assert "CUDA" in result["skipped"]["flashdino-graphs"]
    assert [r["peer"] for r in result["rows"]] == ["flashdino"]
    assert result["rows"][0]["status"] == "ok"
    assert "speedup" not in result["rows"][0] or result["rows"][0]["speedup"] == {}
    assert any("memory mode skipped" in n for n in result["notes"])
    md = (tmp_path / "tiny.md").read_text()
    assert "## skipped peers" in md and "transformers is not installed" in md


def test_render_rewrites_markdown(tmp_path):
    bench.main(_TINY_ARGS + ["--modes", "inference", "--peers", "flashdino", "--out-dir", str(tmp_path)])
    md = tmp_path / "tiny.md"
    md.unlink()
    bench.main(["--render", str(tmp_path / "tiny.json"), "--quiet"])
    assert "## inference" in md.read_text()


# -- targets ------------------------------------------------------------------------------------------------
def _row(peer, t, dtype="fp32", mfu=None):
    return dict(model="dinov3_vits16", res=224, batch=8, dtype=dtype, mode="inference", peer=peer, status="ok",
                time_s=t, mfu=mfu)


def test_targets_met_missed_and_margins():
    rows = [_row("flashdino", 1.0), _row("hf", 1.21),
            _row("flashdino", 2.0, "bf16", mfu=0.40), _row("hf", 2.5, "bf16")]
    got = {t["id"]: t for t in evaluate_targets(rows, torch.device("cpu"), None, full_depth=True)}
    fp32 = got["cpu-vits16-224-b8-fp32"]
    assert fp32["status"] == "met" and fp32["value"] == pytest.approx(1.21) and fp32["margin"] == pytest.approx(0.1)
    bf16 = got["cpu-vits16-224-b8-bf16"]
    assert bf16["status"] == "missed" and bf16["value"] == pytest.approx(1.25)
    assert bf16["margin"] == pytest.approx(1.25 / 1.5 - 1)
    assert got["cpu-vits16-224-b8-bf16-mfu"]["status"] == "missed"
    # GPU targets are not evaluated on a CPU run; a missing case is n/a.
    assert not any(t.startswith("vitl16") for t in got)
    assert evaluate_targets([], torch.device("cpu"), None, True)[0]["status"] == "n/a"
    lines = [fmt_target(t) for t in got.values()]
    assert any(line.startswith("- MET") and "+10.0%" in line for line in lines)


def test_latency_target_uses_time_ratio():
    rows = [dict(model="dinov3_vitb16", res=224, batch=1, dtype="bf16", mode="latency", peer=p, status="ok",
                 time_s=t) for p, t in (("flashdino", 0.004), ("hf", 0.010), ("flashdino-graphs", 0.002))]
    fake_cuda = torch.device("cuda")
    got = [t for t in evaluate_targets(rows, fake_cuda, "NVIDIA H100 80GB HBM3", True)
           if t["id"] == "vitb16-224-b1-latency"]
    assert {t["peer"]: t["status"] for t in got} == {"flashdino": "met", "flashdino-graphs": "met"}
    eager = next(t for t in got if t["peer"] == "flashdino")
    assert eager["value"] == pytest.approx(0.4) and eager["margin"] == pytest.approx(0.25)


def test_dinov2_resolution_rounding():
    cfg = flashdino.get_config("dinov2_vitl14")
    assert res_for(cfg, 512) == 518 and res_for(cfg, 224) == 224
    assert res_for(flashdino.get_config("dinov3_vitl16"), 512) == 512


def test_fd_to_timm_keys():
    cfg = flashdino.get_config("dinov3_vits16plus", depth=1)
    sd = flashdino.models.build_model(cfg).state_dict()
    out, notes = fd_to_timm(sd, cfg)
    assert "reg_token" in out and "blocks.0.gamma_1" in out and "blocks.0.mlp.fc1_g.weight" in out
    assert "blocks.0.attn.q_bias" in out and "blocks.0.attn.v_bias" in out and "blocks.0.attn.qkv.bias" not in out
    assert not any(k.startswith(("mask_token", "rope_embed")) for k in out)


def test_targets_plan():
    cpu = bench.build_plan(torch.device("cpu"), ["dinov3_vits16"], ["fp32"], [224], ["inference"], ["flashdino", "hf"],
                           targets_only=True)
    assert cpu == {("dinov3_vits16", "fp32"): [(224, "inference", 8, ["flashdino", "hf"])],
                   ("dinov3_vits16", "bf16"): [(224, "inference", 8, ["flashdino", "hf"])]}
    gpu = bench.build_plan(torch.device("cuda"), [], ["bf16"], [224], ["inference"], list(bench.PEERS),
                           targets_only=True)
    assert gpu[("dinov3_vitl16", "bf16")] == [(512, "inference", 64, ["flashdino", "hf", "hf-compile"])]
    assert gpu[("dinov3_vit7b16", "bf16")] == [(512, "inference", 8, ["flashdino"])]
    assert (224, "latency", 1, ["flashdino", "flashdino-graphs", "hf"]) in gpu[("dinov3_vitb16", "bf16")]
    assert (224, "training", 128, ["flashdino", "hf"]) in gpu[("dinov3_vitb16", "bf16")]
    full = bench.build_plan(torch.device("cpu"), ["a", "b"], ["fp32", "bf16"], [224, 512], ["inference", "memory"],
                            ["flashdino"])
    assert list(full) == [("a", "fp32"), ("a", "bf16"), ("b", "fp32"), ("b", "bf16")]
    assert full[("a", "fp32")] == [(224, "inference", None, ["flashdino"]), (512, "inference", None, ["flashdino"])]


def test_cli_bench_subcommand(tmp_path, capsys):
    from flashdino.cli import main as cli_main

    assert cli_main(["bench"] + [a for a in _TINY_ARGS if a != "--quiet"]
                    + ["--modes", "inference", "--peers", "flashdino", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["command"].startswith("flashdino bench ")
    assert data["rows"][0]["status"] == "ok"
    assert "wrote" in capsys.readouterr().out


def test_memory_search_doubles_then_bisects():
    calls = []

    def fits_up_to(n, secs=1.0):
        def attempt(k):
            calls.append(k)
            return secs if k <= n else None
        return attempt

    assert bench.search_largest(fits_up_to(37), 14, 512) == (37, 38, "")
    assert calls[:4] == [14, 28, 56, 42]  # doubling until the first OOM, then bisection
    assert bench.search_largest(fits_up_to(10_000), 14, 100) == (100, None,
                                                                 "reached the size limit without running out of memory")
    lo, hi, msg = bench.search_largest(fits_up_to(10_000, secs=99.0), 14, 100, max_try_s=60)
    assert (lo, hi) == (14, None) and "took >" in msg
    assert bench.search_largest(fits_up_to(5), 14, 100)[:2] == (None, 14)


def test_memory_mode_is_skipped_on_cpu(tmp_path):
    result = bench.main(["--device", "cpu", "--modes", "memory", "--depth", "1", "--peers", "flashdino",
                         "--gemm-size", "64", "--no-save", "--quiet"])
    assert result["memory"] == [] and result["rows"] == []
    assert any("memory mode skipped" in n for n in result["notes"])


# -- timing, backends, report ---------------------------------------------------------------------------------
def test_summarize_quartiles():
    s = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["time_s"], s["q1_s"], s["q3_s"], s["iqr_s"]) == (3.0, 2.0, 4.0, 2.0)
    assert (s["min_s"], s["max_s"], s["samples"]) == (1.0, 5.0, 5)
    one = timing.summarize([0.5])
    assert one["time_s"] == one["q1_s"] == one["q3_s"] == 0.5 and one["iqr_s"] == 0
    with pytest.raises(ValueError):
        timing.summarize([])


def test_interleaved_rotates_and_drops_failures():
    order, rounds = [], []

    def ok(name):
        return lambda r: order.append((r, name))

    def broken(r):
        raise RuntimeError("boom")

    samples, errors = timing.interleaved({"a": ok("a"), "b": ok("b"), "c": ok("c"), "x": broken}, 3,
                                         before_round=rounds.append)
    assert rounds == [0, 1, 2]
    # Every round starts one candidate later, so none always runs first (or right after another).
    assert [n for r, n in order if r == 0] == ["a", "b", "c"]
    assert [n for r, n in order if r == 1] == ["b", "c", "a"]
    assert [n for r, n in order if r == 2] == ["c", "a", "b"]
    assert {n: len(v) for n, v in samples.items()} == {"a": 3, "b": 3, "c": 3, "x": 0}
    assert all(t >= 0 for v in samples.values() for t in v)
    assert list(errors) == ["x"] and "boom" in str(errors["x"])


def test_forced_backend_forces_every_op_and_restores(monkeypatch):
    from flashdino import dispatch

    cuda = torch.device("cuda")  # dispatch decides for a CUDA device without needing one
    monkeypatch.setenv("FLASHDINO_BACKEND", "auto")
    default = {op: name for op, (name, _) in dispatch.explain(cuda).items()}
    with backends.forced_backend("torch"):
        assert {name for name, _ in dispatch.explain(cuda).values()} == {"torch"}
    assert {op: name for op, (name, _) in dispatch.explain(cuda).items()} == default
    assert os.environ["FLASHDINO_BACKEND"] == "auto"  # the caller's setting survives
    with backends.forced_backend(None):
        assert {op: name for op, (name, _) in dispatch.explain(cuda).items()} == default


def test_backends_ran(monkeypatch):
    from flashdino import dispatch

    ran = {"rope_attention": "triton", "final_norm": "torch"}
    monkeypatch.setattr(dispatch, "last_backend", ran.get, raising=False)
    assert backends.backends_ran() == ran  # ops that never ran are left out


def test_cpu_info_and_environment_lines():
    info = report.cpu_info()
    assert info["cpu"] and set(info["cpu_isa"]) <= set(report.ISA_FLAGS)
    env = report.environment(torch.device("cpu"))
    lines = "\n".join(report.environment_lines(env, "flashdino bench --ci"))
    assert f"CPU {info['cpu']}" in lines and "ISA:" in lines and "`flashdino bench --ci`" in lines
    for isa in info["cpu_isa"]:
        assert isa in lines


def test_aggregator_flops_match_torch_flop_counter():
    """GEMM + conv FLOPs counted by torch equal the formula minus attention (frame, global, patch-embed ViT)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = flashdino.Aggregator(embed_dim=64, depth=2, num_heads=4, patch_embed="dinov2_vitl14_reg",
                                 patch_embed_kwargs=dict(embed_dim=64, depth=1, num_heads=4)).eval()
    B, S, H, W = 1, 3, 28, 42
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(B, S, 3, H, W))
    n_img, n_tok = B * S, model.patch_start_idx + (H // 14) * (W // 14)  # 5 special + 6 patch tokens per frame
    attention = (4 * n_img * n_tok * n_tok * 64) * (1 + 2) + 2 * (4 * n_img * n_tok * S * n_tok * 64)
    counts = {str(k) for k in counter.get_flop_counts()["Global"]}
    expected = flops.aggregator_flops(model, B, S, H, W)
    if not any("attention" in k for k in counts):
        expected -= attention
    assert counter.get_total_flops() == expected


def test_result_is_saved_after_each_model(tmp_path, monkeypatch):
    """A run stopped part way (a GPU session's timeout) keeps the models it finished."""
    from flashdino.bench import e2e

    saved = []
    real_save = e2e.save
    monkeypatch.setattr(e2e, "save", lambda result, md, out, stem: saved.append(len(result["rows"])) or
                        real_save(result, md, out, stem))
    bench.main(_TINY_ARGS + ["--modes", "inference", "--peers", "flashdino", "--dtypes", "fp32,bf16",
                             "--out-dir", str(tmp_path)])
    assert saved == [1, 2, 2]  # after each (model, dtype), then the final result
    row = json.loads((tmp_path / "tiny.json").read_text())["rows"][0]
    assert row["q1_s"] <= row["time_s"] <= row["q3_s"] and row["iqr_s"] >= 0


# -- the benchmarks/ scripts, in their smallest CPU mode --------------------------------------------------------
_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_cpu_vs_hf_quick(capsys):
    pytest.importorskip("transformers")
    result = _script("bench_cpu_vs_hf").main(["--quick", "--depth", "1", "--res", "32", "--batch", "2",
                                              "--repeats", "1", "--gemm-size", "64", "--no-save"])
    rows = {(r["dtype"], r["peer"]): r for r in result["rows"]}
    assert set(rows) == {(d, p) for d in ("fp32", "amp", "bf16") for p in ("flashdino", "hf")}
    assert all(r["status"] == "ok" and r["batch"] == 2 and r["res"] == 32 for r in rows.values())
    for d in ("fp32", "amp", "bf16"):
        assert set(rows[(d, "flashdino")]["speedup"]) == {"hf"}
        assert rows[(d, "hf")]["check"]["cos"] > 0.999
    assert result["command"].startswith("python benchmarks/bench_cpu_vs_hf.py --quick")
    assert "| dinov3_vits16 (depth 1) | 32 | 2 | amp | hf |" in capsys.readouterr().out


def test_script_aggregator_cpu_smoke(tmp_path):
    assert _script("bench_aggregator").main(["--cpu-smoke", "--frames", "1", "2", "--out", str(tmp_path),
                                             "--name", "agg"]) == 0
    data = json.loads((tmp_path / "agg.json").read_text())
    assert [(r["frames"], r["keep"], r["path"]) for r in data["rows"]] == [
        (s, k, p) for s in (1, 2) for k in ("all", "last") for p in ("fast", "torch")]
    for r in data["rows"]:
        assert r["time_s"] > 0 and r["q1_s"] <= r["time_s"] <= r["q3_s"] and r["gflop"] > 0
        assert r["fast_vs_torch"]["rel_err"] < 1e-6  # a CPU runs the same PyTorch path twice
    assert data["environment"]["cpu"] and "| S | keep | path |" in (tmp_path / "agg.md").read_text()


def test_script_e2e_and_util(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["e2e.py"] + _TINY_ARGS + ["--modes", "inference", "--peers", "flashdino",
                                                                "--out-dir", str(tmp_path)])
    runpy.run_path(str(_BENCHMARKS / "e2e.py"), run_name="__main__")
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["command"].startswith("python benchmarks/e2e.py --device cpu") and data["rows"][0]["status"] == "ok"
    util = _script("_util")
    assert util.attention_flops(2, 3, 5, 7, 8) == 4 * 2 * 3 * 5 * 7 * 8
    assert util.attention_flops(1, 1, 4, 4, 4, backward=True) == 3.5 * 4 * 4 * 4 * 4
    for name in ("cuda_median_ms", "synced", "record", "gemm_tflops"):  # the names the kernel suites import
        assert callable(getattr(util, name))


def test_memory_search_bookkeeping_on_cpu(monkeypatch):
    """The memory mode's records, with the GPU's out-of-memory error simulated above 320 px."""
    import argparse

    from flashdino.bench import e2e
    from flashdino.bench.peers import ModelGroup

    def fake_peak(fn, device):
        out = fn()
        if out["x_norm_patchtokens"].shape[1] > (320 // 16) ** 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate ...")
        return 1.0

    monkeypatch.setattr(e2e, "peak_memory_mib", fake_peak)
    group = ModelGroup(flashdino.get_config("dinov3_vits16", depth=1, embed_dim=32, num_heads=2), "fp32",
                       torch.device("cpu"), ["flashdino"], print)
    group.build()
    runner = e2e.Runner(argparse.Namespace(max_size=1024, max_try_s=60.0), torch.device("cpu"), lambda s: None)
    runner.run_memory(group, "dinov3_vits16", ["flashdino", "flashdino-graphs"])
    (row,) = runner.memory_rows  # CUDA graphs are not searched: they hold a copy of every buffer
    assert row["status"] == "ok" and row["max_size"] == 320 and row["first_oom"] == 336
    assert row["tokens"] == 1 + 4 + 20 * 20
    sizes = [t["size"] for t in row["tries"]]
    assert sizes[:3] == [224, 448, 336] and sizes[-1] in (320, 336)
    assert all(t["ok"] == (t["size"] <= 320) for t in row["tries"])
    assert {t.get("error") for t in row["tries"] if not t["ok"]} == {"out of memory"}


def test_ran_summary_and_note():
    assert report.ran_summary(None) == "not recorded"
    assert report.ran_summary({"a": "torch", "b": "torch"}) == "torch"
    assert report.ran_summary({"b": "torch", "a": "triton"}) == "a=triton, b=torch"
    assert report._note(dict(message="HF train mode", backends={"a": "cuda"})) == "HF train mode; ran: cuda"
