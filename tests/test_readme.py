"""Every ```python block of README.md runs (in order, sharing one namespace and one temp dir).

A block whose first line is ``# not-tested: <reason>`` is skipped (downloads, GPUs, large models,
excerpts of other code). ``flashdino features --sample`` commands in ```bash / ```console blocks
(the README's main job) are run through ``flashdino.cli.main``, in document order with the python
blocks, when they need no weights file. Without a README the tests skip.
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


def _not_tested(code: str):
    """The reason after ``# not-tested:`` on a block's first line ("" without one); None for a tested block."""
    first = code.lstrip().splitlines()[0].strip() if code.strip() else ""
    if not first.lower().startswith("# not-tested"):
        return None
    return first[len("# not-tested"):].lstrip(" :").strip()


def _examples():
    """The README's runnable examples in document order: ("python", line, code) and ("command", line, argv)."""
    items = [("python", line, code) for line, code in _blocks({"python", "py"}) if _not_tested(code) is None]
    items += [("command", line, argv) for line, argv in _sample_commands()]
    return sorted(items, key=lambda item: item[1])


def _run_command(line: int, argv: list) -> None:
    from flashdino import cli

    cmd = " ".join(argv)
    rc = cli.main(argv + ["--quiet"])
    assert rc == 0, f"README.md line {line}: `flashdino {cmd}` exited with {rc}"
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--pca")]
    for o in outs or ["features.safetensors"]:
        assert os.path.exists(o), f"README.md line {line}: `{cmd}` did not write {o}"


def test_readme_examples_run_in_order(tmp_path, monkeypatch):
    # As a reader goes: the `flashdino features --sample` commands and the python blocks, in the order
    # of the README, in one folder and one namespace (a block may read what a command wrote).
    _require_readme()
    examples = _examples()
    if not any(kind == "python" for kind, _, _ in examples):
        pytest.skip("README.md has no tested ```python blocks")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for kind, line, payload in examples:
        if kind == "command":
            _run_command(line, payload)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the random-weights warning of tiny examples
            try:
                exec(compile(payload, f"README.md:{line}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"README.md python block at line {line} failed: {exc.__class__.__name__}: {exc}\n{payload}")


def test_readme_untested_blocks_say_why():
    # "# not-tested: <reason>": a block that could run is not silently left out.
    _require_readme()
    for line, code in _blocks({"python", "py"}):
        assert _not_tested(code) != "", f"README.md line {line}: `# not-tested` without a reason after a colon"


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


def test_readme_has_a_main_job_command():
    # The first-run section's command is among the ones test_readme_examples_run_in_order runs.
    _require_readme()
    cmds = [argv for _, argv in _sample_commands()]
    assert any(argv[:2] == ["features", "--sample"] and "--pca" in argv for argv in cmds), cmds


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
