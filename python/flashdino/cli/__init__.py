"""The ``flashdino`` command line (also ``python -m flashdino``).

    flashdino features IMAGES_OR_FOLDERS --model NAME [--weights PATH] --out FILE.safetensors
                       [--batch-size N] [--device cpu|cuda] [--size 224] [--pca OUT.png]
    flashdino features --sample --model dinov3_vits16 --out sample.safetensors --pca sample_pca.png
    flashdino info
    flashdino models
    flashdino convert SRC OUT [--model NAME]
    flashdino bench ...

One module per command (``cli/<command>.py``, with ``add_parser(sub)`` and ``run(args)``); this
module only parses and reports errors. ``info`` and ``bench`` own their whole argument list.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from . import check, convert, export, features, models
from ._common import CliError
from .features import collect_images
from .pca import pca_rgb, render_pca

# Commands that parse their own arguments: everything after the command word is passed through.
PASSTHROUGH = {
    "info": "environment, kernels and models (flashdino info --help)",
    "bench": "end-to-end benchmark against HF / torch.compile / timm (flashdino bench --help)",
}


def _run_info(rest) -> int:
    from flashdino import info

    return int(info.main(list(rest), prog="flashdino info") or 0)  # an explicit list: sys.argv still holds "info"


def _run_bench(rest) -> int:
    from flashdino.bench import main as bench_main

    bench_main(list(rest), prog="flashdino bench")
    return 0


_PASSTHROUGH_RUN = {"info": _run_info, "bench": _run_bench}


def build_parser() -> argparse.ArgumentParser:
    import flashdino

    parser = argparse.ArgumentParser(prog="flashdino", description="flashdino: fast DINOv2 / DINOv3 / VGGT backbones")
    parser.add_argument("--version", action="version", version=f"flashdino {flashdino.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    features.add_parser(sub)
    features.add_info_parser(sub)
    convert.add_parser(sub)
    check.add_parser(sub)
    export.add_parser(sub)
    models.add_parser(sub)
    for name, help_text in PASSTHROUGH.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, name=name: _PASSTHROUGH_RUN[name](a.rest))
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (temporary files) runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns the exit status (0, 2 for a user error, 130 / 143 when interrupted)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        hint = getattr(exc, "flashdino_hint", "partial outputs were removed")  # set by a command with more to say
        print(f"flashdino: interrupted (Ctrl-C); {hint}", file=sys.stderr)
        return 130
    except _Terminated as exc:
        print(f"flashdino: terminated (SIGTERM); {getattr(exc, 'flashdino_hint', 'partial outputs were removed')}",
              file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def console_main() -> None:
    """The ``flashdino`` script and ``python -m flashdino``: ``main()``, then the process ends."""
    code = main()
    # Once torch is imported, the interpreter's finalisation takes ~0.4 s (its libraries' destructors),
    # a tenth of a small job. The command is over and has closed its outputs, so the process ends
    # after the steps of an ordinary exit that can matter: other non-daemon threads joined (and
    # executors' exit hooks run) by threading's own shutdown, the atexit handlers (multiprocessing's
    # child cleanup, logging), stdio flushed.
    join_threads = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first
    if "torch" not in sys.modules or join_threads is None:
        sys.exit(code)
    join_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    try:  # what native libraries wrote through C's stdio (os._exit does not flush it)
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(code)


def _main(argv: list) -> int:
    if argv and argv[0] in _PASSTHROUGH_RUN:
        return _PASSTHROUGH_RUN[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    if os.environ.get("FLASHDINO_DEBUG"):  # full tracebacks
        return args.func(args)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else propagates unchanged
        if isinstance(exc, _user_errors()):
            print(f"flashdino: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):  # the last net: a full disk, a read-only or unwritable place, a name too long
            print(f"flashdino: error: {os_error_line(exc)}", file=sys.stderr)
            return 2
        raise


def _user_errors() -> tuple:
    """The errors a command reports in one line (exit 2). Imported when one is raised: their modules
    import torch, which a command like ``models`` does not need (1.3 s of its 1.4 s)."""
    from flashdino.deploy._extras import MissingExtraError
    from flashdino.integrations.config import ConfigError
    from flashdino.loading import CheckpointError, WeightsUnavailableError
    from flashdino.outputs import OutputPathError
    from flashdino.preprocess import PreprocessorConfigError

    return (CliError, CheckpointError, WeightsUnavailableError, ConfigError, PreprocessorConfigError, MissingExtraError,
            OutputPathError, FileNotFoundError, ValueError)


# errno -> what to do about it, for the one line a failed write gets
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space there or write somewhere else",
    errno.EDQUOT: "your disk quota is full: free space or write somewhere else",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.EACCES: "no permission: write somewhere you may write, or fix the permissions",
    errno.EPERM: "not permitted: write somewhere you may write, or fix the permissions",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EIO: "an input/output error of the device: check the disk or the network filesystem",
}


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and the fix."""
    where = f" ({exc.filename})" if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    fix = _OS_ERROR_FIXES.get(exc.errno, "FLASHDINO_DEBUG=1 shows where it happened")
    return f"{what}{where}; {fix}"



__all__ = ["main", "build_parser", "collect_images", "pca_rgb", "render_pca", "CliError"]
