"""Every ```python block of README.md runs (in order, sharing one namespace, in a temp dir).

A block whose first line is ``# not-tested`` is skipped (downloads, GPUs, large models). ``flashdino
features --sample`` commands in ```bash / ```console blocks (the README's main job) are run through
``flashdino.cli.main`` when they need no weights file. Without a README the tests skip.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from pathlib import Path

import pytest

# FLASHDINO_README=path tests another file (e.g. a draft section) the same way.
README = Path(os.environ.get("FLASHDINO_README") or Path(__file__).resolve().parents[1] / "README.md")
_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def _blocks(langs):
    if not README.is_file():
        return []
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1).lower() in langs:
            line = text.count("\n", 0, m.start()) + 1
            out.append((line, m.group(2)))
    return out


def _require_readme():
    if not README.is_file():
        pytest.skip(f"{README} does not exist yet")


def test_readme_python_blocks(tmp_path, monkeypatch):
    _require_readme()
    blocks = _blocks({"python", "py"})
    if not blocks:
        pytest.skip("README.md has no ```python blocks")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    ran = 0
    for line, code in blocks:
        first = code.lstrip().splitlines()[0].strip() if code.strip() else ""
        if first.lower().startswith("# not-tested"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the random-weights warning of tiny examples
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"README.md python block at line {line} failed: {exc.__class__.__name__}: {exc}\n{code}")
        ran += 1
    if ran == 0:
        pytest.skip("every ```python block of README.md is marked # not-tested")


def _sample_commands():
    cmds = []
    for line, code in _blocks({"bash", "sh", "shell", "console", "text", ""}):
        for raw in code.replace("\\\n", " ").splitlines():
            for seg in re.split(r"&&|;|\|\|", raw.strip().lstrip("$ ")):
                try:
                    argv = shlex.split(seg)
                except ValueError:
                    continue
                if len(argv) >= 2 and Path(argv[0]).name == "flashdino":
                    argv = argv[1:]
                elif len(argv) >= 4 and Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "flashdino"]:
                    argv = argv[3:]
                else:
                    continue
                if argv[0] == "features" and "--sample" in argv and "--weights" not in argv \
                        and not any(a.startswith("cuda") for a in argv):
                    cmds.append((line, argv))
    return cmds


def test_readme_main_job_command(tmp_path, monkeypatch):
    _require_readme()
    cmds = _sample_commands()
    if not cmds:
        pytest.skip("README.md has no `flashdino features --sample` command to run")
    from flashdino import cli

    monkeypatch.chdir(tmp_path)
    for line, argv in cmds:
        cmd = " ".join(argv)
        rc = cli.main(argv + ["--quiet"])
        assert rc == 0, f"README.md line {line}: `flashdino {cmd}` exited with {rc}"
        outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--pca")]
        for o in outs or ["features.safetensors"]:
            assert os.path.isfile(o), f"README.md line {line}: `{cmd}` did not write {o}"


def _ci_steps():
    ci = Path(__file__).resolve().parents[1] / ".ci" / "run"
    if not ci.is_file():
        pytest.skip(".ci/run is not in this checkout")
    steps = []
    for raw in ci.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            steps.append([a for a in shlex.split(line) if a != "-q"])  # quietness is not a difference
    return steps


def test_readme_test_command_is_what_ci_runs():
    # The README says CI runs its "Tests" command; .ci/run must install the same things and run the
    # same pytest command, or the README's promise is false.
    _require_readme()
    readme_steps = []
    for _, code in _blocks({"bash", "sh", "shell", "console", ""}):
        for raw in code.replace("\\\n", " ").splitlines():
            if "pytest" not in raw:
                continue
            for seg in raw.split("&&"):
                argv = shlex.split(seg.strip())
                if argv and Path(argv[0]).name in ("pip", "python"):  # .venv/bin/pip = the activated pip
                    readme_steps.append([Path(argv[0]).name] + [a for a in argv[1:] if a != "-q"])
    if not readme_steps:
        pytest.skip("README.md has no test command")
    ci_steps = _ci_steps()
    for step in readme_steps:
        assert step in ci_steps, f"README step `{' '.join(step)}` is not in .ci/run: {ci_steps}"


def test_readme_speaks_to_users():
    # Words that only mean something inside the development workspace.
    _require_readme()
    text = README.read_text(encoding="utf-8")
    for pattern in (r"\bissue \d+\b", r"shared/SPEC", r"development machine", r"project workspace"):
        assert not re.search(pattern, text, re.I), f"README.md mentions {pattern!r}"
