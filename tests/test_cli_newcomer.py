"""The command line's front door: help texts, program names, and a cheap ``import flashdino``.

Start-up time itself is measured in ``benchmarks/bench_startup.py``; these tests assert the property
that makes it fast: ``--help`` and ``import flashdino`` never import torch (seconds of start-up).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flashdino
from flashdino import cli

_PACKAGE_PARENT = str(Path(flashdino.__file__).resolve().parents[1])


def _run(args, *, importtime=False):
    """Runs ``python [-X importtime] ARGS`` on this flashdino; returns (rc, stdout, modules imported)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + list(args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                modules.add(name)
    return proc.returncode, proc.stdout, proc.stderr, modules


@pytest.mark.parametrize("args", [
    ["-c", "import flashdino"],
    ["-m", "flashdino", "--help"],
    ["-m", "flashdino", "--version"],
    ["-m", "flashdino", "info", "--help"],
    ["-m", "flashdino", "features", "--help"],
    ["-m", "flashdino", "convert", "--help"],
], ids=lambda a: " ".join(a[1:]))
def test_front_door_does_not_import_torch(args):
    rc, out, err, modules = _run(args, importtime=True)
    assert rc == 0, err
    assert "flashdino" in modules, "the import-time report did not list flashdino: the check is void"
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "numpy", "triton", "safetensors", "PIL"))
    assert not heavy, f"`python {' '.join(args)}` imported {heavy[:5]} before it needed them"


def test_info_help_names_the_command_it_was_called_as():
    rc, out, err, _ = _run(["-m", "flashdino", "info", "--help"])
    assert rc == 0, err
    assert out.startswith("usage: flashdino info "), out
    rc, out, err, _ = _run(["-m", "flashdino.info", "--help"])
    assert rc == 0, err
    assert out.startswith("usage: python -m flashdino.info "), out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flashdino ")
    for command in ("features", "convert", "info", "bench", "models", "check"):
        assert f"\n    {command} " in out, f"`flashdino --help` does not list {command}:\n{out}"


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().err.startswith("usage: flashdino ")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flashdino {flashdino.__version__}"


def test_every_public_name_resolves():
    # Lazy attributes must behave like the eager imports they replace: __all__, dir() and getattr agree.
    for name in flashdino.__all__:
        assert getattr(flashdino, name) is not None, name
    assert set(flashdino.__all__) <= set(dir(flashdino))
    assert set(flashdino.VARIANTS) <= set(flashdino.__all__)
    assert flashdino.dinov3_vits16 is flashdino.factory.ENTRY_POINTS["dinov3_vits16"]
    assert flashdino.Aggregator is flashdino.models.Aggregator
    assert flashdino.convert is flashdino.loading.convert
    assert flashdino.ops.rope_attention is not None
    namespace = {}
    exec("from flashdino import *", namespace)
    assert set(flashdino.__all__) <= set(namespace)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'dinov3_vits17'"):
        flashdino.dinov3_vits17  # noqa: B018
    assert not hasattr(flashdino, "not_a_thing")


def test_check_without_a_gpu_says_so_in_one_line(monkeypatch, capsys):
    import torch

    import flashdino.check.audit as audit

    def no_audit(*args, **kwargs):
        raise AssertionError("`flashdino check` without a GPU must not start the compile audit")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(audit, "main", no_audit)
    rc = cli.main(["check"])
    out, err = capsys.readouterr()
    assert rc == 3  # nothing was checked: `flashdino check && deploy` must not pass here
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "flashdino check --audit" in lines[0], lines


def test_each_test_runs_in_an_empty_folder_of_its_own(tmp_path):
    # tests/conftest.py moves every test out of the checkout: a file a user's earlier run left in the
    # working directory (the README's main command writes features.safetensors and pca.png there)
    # cannot change a test's outcome, and a test's default outputs never land in the checkout.
    cwd = Path.cwd().resolve()
    checkout = Path(__file__).resolve().parents[1]
    assert cwd != checkout and checkout not in cwd.parents
    assert list(cwd.iterdir()) == []
    assert cwd != tmp_path.resolve()  # the test's own tmp_path stays empty for it too
