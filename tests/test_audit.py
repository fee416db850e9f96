"""The compile audit in CI: every Triton launch configuration the dispatch can select by default,
compiled for sm_80 and sm_90 with Triton's own ptxas (no GPU), must not spill registers or exceed
the architecture's shared memory; the committed full audit must match the code's configurations.

The audit runs in a subprocess without TRITON_INTERPRET (kernels decorated under the interpreter
cannot be compiled). bf16 only here ("--quick": fp16 / fp32 select the same tiles); the committed
benchmarks/results/audit_triton.json covers every dtype on sm_80, sm_86, sm_89 and sm_90.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "audit_triton.json"
KERNELS = {
    "rope_attention.fwd", "rope_attention.prepass", "rope_attention.bwd_delta", "rope_attention.bwd_dkdv",
    "rope_attention.bwd_dq", "rope_attention.bwd_post", "residual_layernorm.residual_ln_fwd",
    "residual_layernorm.ln_bwd", "final_norm.final_norm_fwd", "final_norm.final_norm_nchw", "final_norm.ln_bwd",
    "patch_embed.patch_embed",
}


@pytest.fixture(scope="module")
def ci_audit(tmp_path_factory):
    """Runs the audit for sm_80 and sm_90 in two parallel processes; (return codes, merged JSON)."""
    pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")
    folder = tmp_path_factory.mktemp("audit")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    procs = {}
    for arch in ("sm_80", "sm_90"):
        log = open(folder / f"{arch}.log", "w+")  # files, not pipes: two processes never block on a full pipe
        procs[arch] = (subprocess.Popen([sys.executable, "-m", "flashdino.check.audit", arch, "--default-only",
                                         "--quick", "--json", str(folder / f"{arch}.json")], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, text=True), log)
    codes, outputs = {}, {}
    for arch, (proc, log) in procs.items():
        codes[arch] = proc.wait(timeout=900)
        log.seek(0)
        outputs[arch] = (log.read(), "")
        log.close()
    if 3 in codes.values():
        why = next(outputs[a][0].strip().splitlines()[-1] for a, c in codes.items() if c == 3)
        pytest.skip(f"Triton cannot compile for NVIDIA targets here: {why}")
    rows = []
    for arch in procs:
        path = folder / f"{arch}.json"
        assert path.exists(), outputs[arch][0][-3000:] + outputs[arch][1][-3000:]
        rows += json.loads(path.read_text())["rows"]
    return codes, outputs, {"rows": rows}


def test_default_configurations_compile_without_spills(ci_audit):
    codes, outputs, data = ci_audit
    rows = data["rows"]
    bad = [r for r in rows if r["default"] and (r["error"] or r["spill"] or r["shared"] > r["limit"])]
    assert not bad, "\n".join(f"{r['kernel']} {r['arch']} {r['config']} {r['tile']}: regs {r['regs']} spill "
                              f"{r['spill']} smem {r['shared']}/{r['limit']} {r['error'] or ''}" for r in bad)
    assert set(codes.values()) == {0}, {a: o[0][-2000:] for a, o in outputs.items()}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    # every kernel the ops launch was reached by some scenario (a new kernel cannot escape the audit)
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(r["regs"] and r["regs"] <= 255 for r in rows)


def test_committed_audit_is_current_and_clean(ci_audit):
    """benchmarks/results/audit_triton.json must list the tiles the code selects today."""
    _, _, data = ci_audit
    committed = json.loads(COMMITTED.read_text())
    assert committed["failures"] == 0
    assert set(committed["archs"]) >= {"sm_80", "sm_86", "sm_89", "sm_90"}
    listed = {(r["kernel"], r["arch"], r["config"], r["tile"]) for r in committed["rows"] if r["default"]}
    now = {(r["kernel"], r["arch"], r["config"], r["tile"]) for r in data["rows"]}
    stale = now - listed
    assert not stale, (f"launch configurations changed since the audit was committed; regenerate it with "
                       f"`flashdino check --audit sm_80,sm_86,sm_89,sm_90 --json {COMMITTED.relative_to(ROOT)}`: "
                       f"{sorted(stale)[:5]}")
    assert all(not r["spill"] and r["shared"] <= r["limit"] for r in committed["rows"] if r["default"])


def test_check_command_is_wired():
    """``flashdino check`` is a command of the CLI (``python -m flashdino check`` in the GPU session)."""
    from flashdino.cli import build_parser

    args = build_parser().parse_args(["check", "--audit", "sm_80,sm_90", "--json", "x.json", "--quick"])
    assert args.command == "check" and args.audit == "sm_80,sm_90" and args.quick and args.json == "x.json"
    assert build_parser().parse_args(["check"]).audit is None  # probes on a GPU, else the short audit
