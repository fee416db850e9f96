"""On-device tuning (flashdino.check.tune) on CPU: an injected clock and fake candidates.

(tests/conftest.py sets FLASHDINO_TUNE=0 for the other tests; these turn it on.)

A demo op is declared in the dispatch table for these tests only (monkeypatched, so it leaves no
trace): a "torch" reference and a "triton" backend (allowed on CPU tensors under
TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU), each with variants whose cost on
the injected clock is known. ``tune.EXTRA_DEVICE_TYPES`` / ``selfcheck.checking_device_type``
(test-only hooks) make CPU tensors count as a tuned, self-checked device. The last tests run the
real rope_attention candidates (Triton interpreter) with the real clock.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import flashdino.ops  # noqa: F401  (installs the self-check and the tuner)
from flashdino import dispatch
from flashdino.check import selfcheck, tune

OP = "tune_demo"
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the demo op's 'triton' backend runs on CPU tensors only interpreted")


@dataclasses.dataclass(frozen=True)
class DemoCall:
    dtype: torch.dtype
    n: int


class Clock:
    """The injected clock: only the fake candidates move it, by their cost."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now


def _reference(x):
    return x * 2 + 1


@pytest.fixture
def demo(monkeypatch, tmp_path):
    """Declares the demo op; returns (run, clock, costs, broken): ``costs`` maps a candidate name
    to its milliseconds, ``broken`` holds the candidates that return wrong numbers."""
    monkeypatch.setenv("FLASHDINO_SELFCHECK_CACHE", str(tmp_path / "selfcheck.json"))
    monkeypatch.setenv("FLASHDINO_SELFCHECK", "1")
    monkeypatch.delenv("FLASHDINO_TUNE", raising=False)
    clock = Clock()
    costs = {"torch": 5.0, "torch:sdpa-slow": 8.0, "triton": 3.0, "triton:fast": 1.0, "triton:hopeless": 50.0}
    broken: set = set()

    def candidate(name):
        def fn(x):
            if not getattr(selfcheck._ACTIVE, "on", False):  # a self-check probe is not a timed run
                clock.calls.append(name)
            clock.now += costs[name] / 1000
            out = _reference(x)
            return out + 0.5 if name in broken else out
        return fn

    monkeypatch.setitem(dispatch._OPS, OP, dispatch.Op(OP, DemoCall, ("triton", "torch"),
                                                       lambda device: DemoCall(torch.float32, 16)))
    monkeypatch.setitem(dispatch._REGISTRY, OP, {
        "torch": dispatch.Impl(candidate("torch"), dispatch._always),
        "triton": dispatch.Impl(candidate("triton"), dispatch._always)})
    monkeypatch.setitem(dispatch._VARIANTS, OP, {
        "torch": {"sdpa-slow": dispatch.Impl(candidate("torch:sdpa-slow"), dispatch._always)},
        "triton": {name: dispatch.Impl(candidate(f"triton:{name}"), dispatch._always)
                   for name in ("fast", "hopeless")}})
    monkeypatch.setitem(selfcheck.PROBES, OP, lambda call, device: selfcheck.Probe(
        "demo", (torch.arange(6.0, device=device),), 1e-6))
    monkeypatch.setitem(tune.WORKLOADS, OP, tune.Workload(
        bucket=lambda call: (str(call.dtype), tune._pow2(call.n)),
        build=lambda call, device: (torch.zeros(call.n, device=device, dtype=call.dtype),),
        describe=lambda bucket: f"{bucket[0]} n<={bucket[1]}"))
    # The probes run the candidates too; only the timed runs should count on the clock's record.
    monkeypatch.setattr(tune, "MAX_RUNS", 5)
    tune.set_clock(clock)
    tune.EXTRA_DEVICE_TYPES.add("cpu")
    tune.reset()
    try:
        with selfcheck.checking_device_type("cpu"):
            def run(x):
                fn, name, _ = dispatch.select(OP, DemoCall(x.dtype, x.shape[0]), x.device)
                return fn(x)
            yield run, clock, costs, broken
    finally:
        tune.set_clock(None)
        tune.EXTRA_DEVICE_TYPES.discard("cpu")
        tune.reset()


def _decision():
    (decision,) = [d for (op, _, _), d in tune.decisions().items() if op == OP]
    return decision


@needs_interpreter
def test_tune_chooses_the_fastest_candidate_and_caches_it(demo, tmp_path):
    run, clock, costs, _ = demo
    x = torch.randn(16)
    torch.testing.assert_close(run(x), _reference(x))
    decision = _decision()
    assert (decision.backend, decision.variant) == ("triton", "fast")
    assert dispatch.last_backend(OP) == "triton"
    times = {name: r["ms"] for name, r in decision.candidates.items()}
    for name in ("torch", "triton", "triton:fast", "torch:sdpa-slow"):
        assert times[name] == pytest.approx(costs[name])
    assert decision.pytorch_ms == pytest.approx(5.0)
    # every timed candidate ran once untimed first (compilation on a GPU): reported apart from the timing
    timed_cost = sum(costs[n] for n, r in decision.candidates.items() if r["ms"] is not None) / 1000
    assert decision.first_use_s >= timed_cost
    assert decision.seconds + decision.first_use_s == pytest.approx(clock.now - costs["triton:fast"] / 1000)
    assert "3.0" not in decision.reason() and "5.00x" in decision.reason()  # PyTorch 5 ms / 1 ms
    # the next calls of the bucket (n = 9..16) run the choice, and time nothing
    clock.calls.clear()
    run(torch.randn(9))
    run(x)
    assert clock.calls == ["triton:fast", "triton:fast"]
    # another bucket is tuned on its own
    run(torch.randn(17))
    assert len([k for k in tune.decisions() if k[0] == OP]) == 2
    # a new process (reset) reads the stored decision: nothing is timed again
    stored = json.loads((tmp_path / "tune.json").read_text())[selfcheck.fingerprint(x.device)]
    assert stored[f"{OP} | float32 | 16"]["variant"] == "fast"
    tune.reset()
    clock.calls.clear()
    run(x)
    assert clock.calls == ["triton:fast"]
    assert _decision().source == "stored"


@needs_interpreter
def test_tune_never_chooses_a_candidate_that_failed_its_self_check(demo):
    run, clock, costs, broken = demo
    broken.add("triton:fast")
    costs["triton:fast"] = 0.01  # by far the fastest, and wrong
    x = torch.randn(16)
    torch.testing.assert_close(run(x), _reference(x))
    decision = _decision()
    assert decision.name == "triton"  # the next fastest that passed
    assert decision.candidates["triton:fast"]["status"].startswith("skipped: disabled by the self-check")
    assert decision.candidates["triton:fast"]["ms"] is None
    clock.calls.clear()
    run(x)
    assert clock.calls == ["triton"]


@needs_interpreter
def test_tune_drops_clearly_slower_candidates_and_keeps_to_the_budget(demo, monkeypatch):
    run, clock, costs, _ = demo
    run(torch.randn(16))
    decision = _decision()
    hopeless = decision.candidates["triton:hopeless"]
    assert hopeless["status"] == "stopped early" and hopeless["runs"] == tune.MIN_RUNS
    assert decision.candidates["triton"]["runs"] == tune.MAX_RUNS
    # with a budget spent by the first candidates, only the fixed order's choice and PyTorch are timed
    monkeypatch.setattr(tune, "BUDGET_S", 0.001)
    tune.reset()
    decision = tune.tune(OP, DemoCall(torch.float32, 64), torch.device("cpu"), budget=0.001)
    timed = {n for n, r in decision.candidates.items() if r["ms"] is not None}
    assert timed == {"triton", "torch"}
    assert decision.candidates["triton:fast"]["status"].startswith("skipped: the 0.001 s budget")
    assert decision.name == "triton"


@needs_interpreter
def test_tune_store_is_invalidated_by_a_version_driver_or_override_change(demo, monkeypatch):
    run, clock, costs, _ = demo
    x = torch.randn(16)

    def tuned_again() -> bool:
        tune.reset()
        selfcheck.reset()
        clock.calls.clear()
        run(x)
        return len(clock.calls) > 1

    assert tuned_again()  # first use
    assert not tuned_again()  # stored: read back
    monkeypatch.setattr(selfcheck, "_versions", lambda: "flashdino 9.9 | torch x | triton y")
    assert tuned_again() and not tuned_again()
    monkeypatch.setattr(selfcheck, "_driver", lambda device: "999.1")
    assert tuned_again() and not tuned_again()
    for name, value in (("FLASHDINO_ROPE_ATTN_K_ROTATION", "inline"), ("FLASHDINO_ROPE_ATTN_FWD_CFG", "64,64,4,2"),
                        ("FLASHDINO_ROPE_ATTN_BWD_CFG", "64,64,4,2"), ("FLASHDINO_BACKEND_FINAL_NORM", "torch")):
        monkeypatch.setenv(name, value)
        assert tuned_again(), name
        assert not tuned_again()
    # a stored choice that no longer exists (renamed variant) is measured again, not trusted
    path = tune.store_path()
    data = json.loads(path.read_text())
    for entries in data.values():
        for entry in entries.values():
            entry["variant"] = "gone"
    path.write_text(json.dumps(data))
    assert tuned_again()


@needs_interpreter
def test_tune_times_nothing_while_tracing_or_capturing(demo, monkeypatch):
    run, clock, costs, _ = demo
    x = torch.randn(16)
    monkeypatch.setattr(selfcheck, "_tracing", lambda device: True)  # what compile / capture look like
    run(x)
    assert clock.calls == ["torch"]  # the fixed order (off CUDA: the reference), no timing, no decision
    assert not tune.decisions() and clock.now == pytest.approx(0.005)


@needs_interpreter
def test_tune_table_is_read_by_fullgraph_compile_which_times_nothing(monkeypatch, tmp_path):
    """A real ``torch.compile(fullgraph=True)`` trace of rope_attention reads the decision table
    and never tunes: before any decision it keeps the fixed order, after one it uses the choice."""
    from flashdino import ops
    from flashdino.ops.rope_attention import RopeAttentionCall, RopeGrid

    monkeypatch.setenv("FLASHDINO_SELFCHECK_CACHE", str(tmp_path / "selfcheck.json"))
    monkeypatch.setenv("FLASHDINO_TUNE", "1")
    monkeypatch.setattr(tune, "EXTRA_DEVICE_TYPES", {"cpu"})
    tune.reset()

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned while tracing")

    grid = RopeGrid("vggt", 2, 3, 1)
    qkv = torch.randn(2, 14, 3 * 2 * 16)
    f = torch.compile(lambda t: ops.rope_attention(t, 2, grid), fullgraph=True, backend="eager")
    try:
        monkeypatch.setattr(tune, "tune", no_tuning)
        monkeypatch.setattr(tune, "_stored", lambda *a: None)
        torch._dynamo.reset()
        with pytest.MonkeyPatch.context() as m:  # trace only: the first call of the compiled function
            m.setattr(selfcheck, "_tracing", lambda device: torch.compiler.is_compiling())
            out = f(qkv)
        torch.testing.assert_close(out, ops.rope_attention(qkv, 2, grid, backend="torch"))
        assert not tune.decisions()
        # a decision made eagerly is what the next trace uses
        key = ("rope_attention", ("cpu", None), tune._rope_bucket(RopeAttentionCall(
            dtype=qkv.dtype, head_dim=16, n_tokens=14, token_stride=96, rope=grid, qk_norm=False, batch=2,
            num_heads=2)))
        monkeypatch.setitem(tune._TABLE, key, ("torch", "spy", "test decision"))
        calls = []
        real = dispatch.implementation("rope_attention", "torch")
        monkeypatch.setitem(dispatch._VARIANTS["rope_attention"]["torch"], "spy",
                            dispatch.Impl(lambda *a: calls.append(1) or real(*a), dispatch._always))
        torch._dynamo.reset()
        torch.testing.assert_close(f(qkv), out)
        assert calls  # traced through the tuned variant
    finally:
        tune.reset()
        torch._dynamo.reset()


@needs_interpreter
def test_tune_is_bypassed_by_use_backend_and_the_switch(demo, monkeypatch):
    run, clock, costs, _ = demo
    x = torch.randn(16)
    with dispatch.use("torch"):
        run(x)
    assert clock.calls == ["torch"] and not tune.decisions()
    fn, name, _ = dispatch.select(OP, DemoCall(x.dtype, 16), x.device, backend="torch")
    assert name == "torch" and not tune.decisions()
    monkeypatch.setenv(f"FLASHDINO_BACKEND_{OP.upper()}", "torch")
    clock.calls.clear()
    run(x)
    assert clock.calls == ["torch"] and not tune.decisions()
    monkeypatch.delenv(f"FLASHDINO_BACKEND_{OP.upper()}")
    monkeypatch.setenv("FLASHDINO_TUNE", "0")
    clock.calls.clear()
    run(x)
    assert clock.calls == ["torch"] and not tune.decisions()  # the fixed rule (off CUDA: the reference)
    monkeypatch.setenv("FLASHDINO_TUNE", "1")
    run(x)
    assert _decision().name == "triton:fast"
    with dispatch.use("torch"):  # a decision exists now: use() still wins
        clock.calls.clear()
        run(x)
    assert clock.calls == ["torch"]


def test_tune_buckets_are_powers_of_two_of_tokens_and_batch_x_heads():
    from flashdino.ops.rope_attention import RopeAttentionCall, RopeGrid

    def call(n, b, h, mode="dinov3"):
        grid = RopeGrid(mode, 1, n - 1, 1, periods=torch.ones(16)) if mode == "dinov3" else None
        return RopeAttentionCall(dtype=torch.bfloat16, head_dim=64, n_tokens=n, token_stride=3 * h * 64, rope=grid,
                                 qk_norm=False, batch=b, num_heads=h)

    assert tune._rope_bucket(call(1029, 64, 16)) == (torch.bfloat16, 64, "dinov3", False, 2048, 1024)
    assert tune._rope_bucket(call(1025, 60, 16)) == tune._rope_bucket(call(2048, 64, 16))
    assert tune._rope_bucket(call(1024, 64, 16)) != tune._rope_bucket(call(1025, 64, 16))
    assert tune._rope_bucket(call(201, 8, 6))[-2:] == (256, 64)


@needs_interpreter
def test_tune_real_rope_attention_candidates_on_the_interpreter(monkeypatch, tmp_path):
    """The real candidates of rope_attention (Triton in the interpreter, with an audited launch
    configuration; the PyTorch path with each SDPA kernel) are checked, timed with the real clock
    and one that passed is chosen; the op's result is the reference's."""
    from flashdino import ops
    from flashdino.ops.rope_attention import RopeAttentionCall, RopeGrid, reference

    monkeypatch.setenv("FLASHDINO_SELFCHECK_CACHE", str(tmp_path / "selfcheck.json"))
    monkeypatch.setenv("FLASHDINO_TUNE", "1")
    monkeypatch.setattr(tune, "EXTRA_DEVICE_TYPES", {"cpu"})
    monkeypatch.setattr(tune, "MAX_RUNS", 3)
    periods = 100.0 ** (2 * torch.arange(16 // 4, dtype=torch.float32) / 8)
    grid = RopeGrid("dinov3", 3, 4, 1, periods=periods)
    qkv = torch.randn(2, 13, 3 * 2 * 16, dtype=torch.float16)  # (the interpreter has no bf16)
    tune.reset()
    with selfcheck.checking_device_type("cpu"):
        try:
            out = ops.rope_attention(qkv, 2, grid)
            (decision,) = tune.decisions().values()
        finally:
            tune.reset()
    torch.testing.assert_close(out.float(), reference.rope_attention(qkv, 2, grid).float(), atol=2e-2, rtol=2e-2)
    names = set(decision.candidates)
    assert {"triton", "torch", "torch:sdpa-flash", "torch:sdpa-efficient", "torch:sdpa-cudnn"} <= names
    assert decision.candidates[decision.name]["ms"] > 0
    assert not decision.candidates[decision.name]["status"].startswith(("skipped", "failed"))
    # cuDNN attention has no CPU kernel: it fails its probe and is never timed
    assert decision.candidates["torch:sdpa-cudnn"]["ms"] is None
    call = RopeAttentionCall(dtype=torch.bfloat16, head_dim=64, n_tokens=1029, token_stride=3 * 1024, rope=grid,
                             qk_norm=False, batch=64, num_heads=16)
    from flashdino.ops.rope_attention import triton as tra

    configs = tra.fwd_candidates(call)
    assert configs[0] == tra.FWD_CONFIGS[("half", 64)] and len(configs) == 1 + len(tra.FWD_CANDIDATES[("half", 64)])
    variants = dispatch.variants("rope_attention", "triton", call)
    assert set(variants) == {""} | {tra.config_name(c) for c in configs[1:]}


@needs_interpreter
def test_tune_triton_honours_a_chosen_launch_configuration():
    from flashdino.ops.rope_attention import RopeGrid, reference
    from flashdino.ops.rope_attention import triton as tra

    grid = RopeGrid("vggt", 3, 5, 2)
    qkv = torch.randn(2, 17, 3 * 2 * 64, dtype=torch.float16)  # (the interpreter has no bf16)
    ref = reference.rope_attention(qkv, 2, grid).float()
    for cfg in tra.FWD_CANDIDATES[("half", 64)][:2]:
        out = tra.rope_attention(qkv, 2, grid, fwd_config=cfg)
        torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)
    assert tra._fwd_config(64, torch.bfloat16, [64, 128, 8, 2]) == (64, 128, 8, 2)
    # the configuration travels through the custom op: torch.compile(fullgraph) traces it, with autograd
    cfg = tra.FWD_CANDIDATES[("half", 64)][2]
    x = qkv.float().requires_grad_()
    f = torch.compile(lambda t: tra.rope_attention(t, 2, grid, fwd_config=cfg).square().sum(), fullgraph=True,
                      backend="aot_eager")
    (grad,) = torch.autograd.grad(f(x), x)
    x_ref = qkv.float().requires_grad_()
    (grad_ref,) = torch.autograd.grad(reference.rope_attention(x_ref, 2, grid).square().sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


def test_tune_selfcheck_probes_the_models_specialisation_and_keys_on_overrides(monkeypatch):
    """The self-check probe has the call's heads, head dim, grid and prefix count, and sizes that
    Triton specialises like the call's (ints equal to 1 become constants, multiples of 16 are
    marked divisible): the probe compiles the kernel the model runs."""
    from flashdino.ops.rope_attention import RopeAttentionCall, RopeGrid

    def cls(n):
        return (n == 1, n % 16 == 0)

    for n_prefix, (H, W), frames, batch, heads in (
            (5, (32, 32), 1, 64, 16), (1, (37, 37), 1, 3, 24), (5, (37, 37), 100, 1, 16), (0, (16, 16), 3, 32, 6)):
        grid = RopeGrid("vggt", H, W, n_prefix)
        n = frames * grid.tokens_per_frame
        call = RopeAttentionCall(dtype=torch.bfloat16, head_dim=64, n_tokens=n, token_stride=3 * heads * 64,
                                 rope=grid, qk_norm=True, batch=batch, num_heads=heads)
        probe = selfcheck._rope_probe(call, torch.device("cpu"))
        qkv, probe_heads, probe_grid = probe.args[:3]
        assert probe_heads == heads and qkv.shape[-1] == 3 * heads * 64
        assert (probe_grid.height, probe_grid.width, probe_grid.n_prefix) == (H, W, n_prefix)
        assert cls(qkv.shape[0]) == cls(batch) and cls(qkv.shape[1]) == cls(n)
        assert qkv.shape[1] <= max(n, 2 * grid.tokens_per_frame * 8) and qkv.shape[0] <= 16
        assert qkv.stride(1) == call.token_stride
    monkeypatch.delenv("FLASHDINO_TUNE", raising=False)
    base = selfcheck.fingerprint(torch.device("cpu"))
    for name, value in (("FLASHDINO_ROPE_ATTN_K_ROTATION", "table"), ("FLASHDINO_ROPE_ATTN_FWD_CFG", "64,64,4,2"),
                        ("FLASHDINO_ROPE_ATTN_BWD_CFG", "32,32,4,2"), ("FLASHDINO_TUNE", "0")):
        monkeypatch.setenv(name, value)
        now = selfcheck.fingerprint(torch.device("cpu"))
        assert now != base and f"{name}={value}" in now
        base = now


@needs_interpreter
def test_tune_check_report_and_info_show_every_candidate_and_the_ratio_to_pytorch(demo, capsys):
    run, clock, costs, _ = demo
    rows = tune.run_report(torch.device("cpu"), [("demo call", OP, DemoCall(torch.float32, 16))], budget=1.0)
    text = tune.format_report(rows)
    assert f"{OP}  torch.float32 n<=16  (demo call)" in text
    rows_ms = {line.lstrip(" *").split()[0]: line.split("ms")[0].split()[-1] for line in text.splitlines()[1:-1]}
    assert rows_ms == {"triton": "3.000", "torch": "5.000", "triton:fast": "1.000", "triton:hopeless": "50.000",
                       "torch:sdpa-slow": "8.000"}
    assert "  * triton:fast " in text  # the chosen one is marked
    assert "chosen / PyTorch's path = 0.20 (5.00x the speed)" in text
    assert "stopped early" in text  # triton:hopeless
    # flashdino info lists the stored choice
    from flashdino import info

    facts = info.collect()
    (stored,) = [c for c in facts["tuning"]["choices"] if c["op"] == OP]
    assert stored["choice"] == "triton:fast" and stored["ms"] == pytest.approx(1.0)
    assert stored["pytorch_ms"] == pytest.approx(5.0)
    assert "triton:fast 1.000 ms (PyTorch 5.000 ms, 5.00x)" in info.format_report(facts)
    # without a GPU the command says so in one line
    from flashdino.cli import build_parser

    args = build_parser().parse_args(["check", "--tune"])
    if not torch.cuda.is_available():
        assert args.func(args) == 3
        out = capsys.readouterr().out.strip().splitlines()
        assert out == [out[0]] and "no CUDA GPU here" in out[0]
