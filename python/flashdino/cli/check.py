"""``flashdino check``: is this GPU safe for flashdino's kernels?

    flashdino check                      the full self-check probe set on the current GPU (< 1 min);
                                         without a GPU: says so in one line and points at --audit
    flashdino check --audit sm_80,sm_90  compile every selectable Triton configuration for these
                                         architectures (no GPU needed) [--json FILE] [--default-only]
                                         [--quick: bf16 only]
    flashdino check --tune               on-device tuning of the models' typical attention calls:
                                         every candidate's time, the choice and its ratio to
                                         PyTorch's path; the choices are stored for later runs
                                         (up to 4 s of timing per call, plus compiling each Triton
                                         configuration once) [--json FILE]

Exit status: 0 healthy; 1 a probe failed / a default configuration spills or overflows shared
memory; 3 nothing was checked: no CUDA GPU for the probes or the tuning, or no usable Triton for
the audit (so that `flashdino check && ...` never passes on a machine where nothing ran).
"""

from __future__ import annotations

import sys

NOTHING_CHECKED = 3  # the exit status when no probe or audit could run here


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("check", help="self-check the kernels on this GPU, or audit their compiled resources",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--audit", metavar="ARCHS", nargs="?", const="sm_80,sm_86,sm_89,sm_90", default=None,
                   help="compile audit for these architectures (default sm_80,sm_86,sm_89,sm_90)")
    p.add_argument("--json", metavar="FILE", help="also write the audit (or probe, or tuning) results as JSON")
    p.add_argument("--default-only", action="store_true",
                   help="audit only the configurations selectable by default (faster)")
    p.add_argument("--quick", action="store_true", help="audit bf16 configurations only (what CI runs)")
    p.add_argument("--tune", action="store_true",
                   help="time every candidate of the models' typical attention calls on this GPU and store the fastest")
    p.set_defaults(func=run)


def _audit(archs: str, json_path, default_only: bool, quick: bool = False) -> int:
    from flashdino.check import audit

    names = tuple(a.strip() for a in archs.split(",") if a.strip())
    return audit.main(names, json_path, default_only, quick=quick)


def _probes(json_path) -> int:
    import json
    import time

    import torch

    import flashdino.ops  # noqa: F401  (registers the backends)
    from flashdino import dispatch
    from flashdino.check import selfcheck

    device = torch.device("cuda", torch.cuda.current_device())
    print(f"flashdino check on {selfcheck.fingerprint(device)}")
    unavailable = dispatch.unavailable()
    for backend, why in unavailable.items():
        print(f"  {backend}: {why}")
    start = time.perf_counter()
    rows = selfcheck.run_all(device)
    seconds = time.perf_counter() - start
    head = ("op", "backend", "dtype", "probe", "max err", "ms", "result")
    body = [(r["op"], r["backend"], r["dtype"], r["variant"], "-" if r["error"] is None else f"{r['error']:.1e}",
             f"{r['ms']:.0f}", r["result"]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    failed = [r for r in rows if r["result"].startswith("FAIL")]
    ran = [r for r in rows if r["result"] == "ok" or r["result"].startswith("FAIL")]
    print(f"\n{len(ran)} probes in {seconds:.1f} s: {len(ran) - len(failed)} passed, {len(failed)} failed, "
          f"{len(rows) - len(ran)} skipped (backend not applicable on this GPU).")
    if failed:
        print("A failing backend is disabled automatically at first use; FLASHDINO_BACKEND=torch runs the "
              "PyTorch reference everywhere. Please report the table and `flashdino info`.")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(dict(device=selfcheck.fingerprint(device), seconds=seconds, rows=rows), f, indent=1)
    return 1 if failed else 0


def _tune(json_path) -> int:
    import json

    import torch

    import flashdino.ops  # noqa: F401  (registers the backends and installs the tuner)
    from flashdino.check import selfcheck, tune

    device = torch.device("cuda", torch.cuda.current_device())
    print(f"flashdino check --tune on {selfcheck.fingerprint(device)}", flush=True)
    if not tune.enabled():
        print("  note: FLASHDINO_TUNE=0 is set, so these measurements are stored but not used by this process")
    rows = tune.run_report(device)
    print(tune.format_report(rows))
    print(f"\nStored in {tune.store_path()}: later processes on this GPU, driver, versions and overrides use these "
          f"choices without timing again.")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(dict(device=selfcheck.fingerprint(device), rows=rows), f, indent=1)
    return 0


def run(args) -> int:
    if args.audit is not None:
        return _audit(args.audit, args.json, args.default_only, args.quick)
    import torch

    if args.tune:
        if not torch.cuda.is_available():
            print("flashdino check --tune: no CUDA GPU here; tuning measures the kernels on the GPU that runs them "
                  "(run it on that machine)")
            return NOTHING_CHECKED
        return _tune(args.json)

    if not torch.cuda.is_available():
        # Not an audit in disguise: that compiles for minutes and prints hundreds of rows the
        # user did not ask for. One line, and the command that does work here.
        print("flashdino check: no CUDA GPU here, so no kernel was checked (exit status 3); "
              "`flashdino check --audit --quick` compiles the Triton kernels for GPUs without one (minutes).")
        return NOTHING_CHECKED
    return _probes(args.json)


def main(argv=None) -> int:  # pragma: no cover - convenience
    import argparse

    parser = argparse.ArgumentParser(prog="flashdino")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
