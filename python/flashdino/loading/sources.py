"""Turning a ``weights=`` argument into tensors: files, folders, tags, URLs, hub ids, dicts.

This is the only module of flashdino that touches the network. Every download has a bounded
wait: ``FLASHDINO_DOWNLOAD_TIMEOUT`` seconds (default 30) without a byte ends an attempt, and so does
a server slower than ``FLASHDINO_DOWNLOAD_MIN_RATE`` bytes/s (default 1024) over any window of
``FLASHDINO_DOWNLOAD_TIMEOUT`` seconds (a server trickling one byte a second never makes the wait
endless); at most ``FLASHDINO_DOWNLOAD_RETRIES`` more attempts follow (default 2), and
``FLASHDINO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) uses caches only and fails at once when something
is missing. So a URL download that receives nothing ends within about
``(RETRIES + 1) * TIMEOUT`` seconds plus short pauses.

URLs are cached under ``torch.hub.get_dir()/checkpoints`` by a hash of the whole URL (two URLs with
the same file name are two files); partial downloads never stay behind. A download enters the
cache only when it is known to be complete: its length equals the server's ``Content-Length``, or,
when the server sends none, the file parses as a whole checkpoint (safetensors header and data
size, zip central directory, or a full safe load). Hub ids go through
``huggingface_hub`` (its cache), after a quick check that the hub answers at all, because the
client's own retries turn a silent endpoint into minutes of waiting. Failures that the user can fix
(gated repository, no login, offline, missing file) become :class:`WeightsUnavailableError` with
the fix spelled out.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

import torch.hub
from safetensors import safe_open
from tqdm import tqdm

from ..env import env_float, env_int
from .errors import CheckpointError, WeightsUnavailableError
from .files import completeness_problem, read_state_dict, unwrap_state_dict
from .hf import (CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, read_hf_folder_raw,
                 shard_names)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

TIMEOUT_ENV = "FLASHDINO_DOWNLOAD_TIMEOUT"
RETRIES_ENV = "FLASHDINO_DOWNLOAD_RETRIES"
OFFLINE_ENV = "FLASHDINO_OFFLINE"
MIN_RATE_ENV = "FLASHDINO_DOWNLOAD_MIN_RATE"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MIN_RATE = 1024.0
DEFAULT_RETRIES = 2
_CHUNK = 1 << 20


@dataclass
class Source:
    """Tensors read from a weights argument, and what is known about them."""

    state_dict: dict
    origin: str
    hf_config: Optional[dict] = None
    preprocessor: Optional[dict] = None
    metadata: dict = field(default_factory=dict)


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def is_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not os.path.exists(s)


def looks_like_pretrained_source(s) -> bool:
    """True for a folder, a file, a URL or a hub id (used to tell these from variant names)."""
    if not isinstance(s, (str, os.PathLike)):
        return False
    s = os.fspath(s)
    return os.path.isdir(s) or os.path.isfile(s) or is_url(s) or is_hub_id(s)


# ------------------------------------------------------------------------------------- settings


def download_timeout() -> float:
    """Seconds an attempt may wait for the server (connect, or between two received bytes); also the
    window over which the minimum rate is measured. 0 means the default."""
    return env_float(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, minimum=0) or DEFAULT_TIMEOUT_S


def download_min_rate() -> float:
    """Bytes per second below which (averaged over a window of :func:`download_timeout` seconds) an
    attempt is given up. 0 switches the check off."""
    return env_float(MIN_RATE_ENV, DEFAULT_MIN_RATE, minimum=0)


def download_retries() -> int:
    return env_int(RETRIES_ENV, DEFAULT_RETRIES, minimum=0, maximum=100)


def offline() -> bool:
    truthy = ("1", "true", "yes", "on")
    return any(os.environ.get(n, "").strip().lower() in truthy for n in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def _settings_hint() -> str:
    return (f"waits are limited by {TIMEOUT_ENV} (now {download_timeout():g} s), {MIN_RATE_ENV} (now "
            f"{download_min_rate():g} bytes/s) and {RETRIES_ENV} (now {download_retries()}); set {OFFLINE_ENV}=1 "
            "to use cached files only")


# ------------------------------------------------------------------------------------- resolving


def _safetensors_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # read_state_dict reports unreadable files
        return {}


def read_file(path: Path, origin: Optional[str] = None) -> Source:
    return Source(read_state_dict(path), origin or str(path), metadata=_safetensors_metadata(path))


def read_folder(folder: Path) -> Source:
    flashdino_files = sorted(folder.glob("*.safetensors"))
    if not (folder / CONFIG_NAME).is_file() and len(flashdino_files) == 1:
        return read_file(flashdino_files[0])
    config, sd, pre = read_hf_folder_raw(folder)
    return Source(sd, str(folder), hf_config=config, preprocessor=pre,
                  metadata=_safetensors_metadata(folder / WEIGHTS_NAME))


def resolve(source, weight_tags: Optional[dict] = None, model_name: str = "the model") -> Source:
    """Reads the tensors behind any supported ``weights=`` value."""
    weight_tags = weight_tags or {}
    if isinstance(source, Mapping):
        return Source(unwrap_state_dict(dict(source), "the state dict"), "state dict")
    if source is None:
        raise WeightsUnavailableError(
            f"{model_name} has no published weights; pass weights=PATH to a checkpoint file or folder"
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a path, a hub id, a URL, a weights tag or a state dict, "
                        f"got {type(source).__name__}")
    return read_location(locate(source, weight_tags, model_name))


def locate(source, weight_tags: Optional[dict] = None, model_name: str = "the model") -> Path:
    """The local file or folder behind a path, weights tag, URL or hub id (downloading it if needed).

    Cheap for local paths, so callers check a source before doing expensive work.
    """
    weight_tags = weight_tags or {}
    s = os.fspath(source)
    path = Path(s).expanduser()
    if path.exists():
        return path
    tag = next((t for t in weight_tags if t.lower() == s.lower()), None)  # "lvd1689m" or "LVD1689M"
    if tag is not None:
        return locate(weight_tags[tag], weight_tags, model_name)
    if is_url(s):
        return download_url(s)
    if is_hub_id(s):
        try:
            return download_hub(s)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(f"{exc} (nor is {s} a local file or folder)") from exc
    tags = f"; weights tags of {model_name}: {', '.join(sorted(weight_tags))}" if weight_tags else ""
    raise CheckpointError(f"checkpoint not found: {s} (not a file, a folder, a URL or a hub id 'org/name'){tags}")


def read_location(path: Path) -> Source:
    return read_folder(path) if path.is_dir() else read_file(path)


# ------------------------------------------------------------------------------------- URLs


def url_cache_path(url: str) -> Path:
    """Where a URL is cached: the file name for people, a hash of the whole URL for uniqueness."""
    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-120:]
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{digest}-{name}"


class _Stalled(TimeoutError):
    """The server sends, but slower than the minimum rate: the attempt ends (and may be retried)."""


class _RateGuard:
    """Fails an attempt whose bytes arrive slower than ``min_rate`` over any ``window`` seconds."""

    def __init__(self, window: float, min_rate: float):
        self.window, self.min_rate = window, min_rate
        self.start = self.mark_time = time.monotonic()
        self.mark_bytes = 0

    def update(self, received: int) -> None:
        if not self.min_rate:
            return
        now = time.monotonic()
        if now - self.mark_time < self.window:
            return
        rate = (received - self.mark_bytes) / (now - self.mark_time)
        if rate < self.min_rate:
            raise _Stalled(f"the server sent {received - self.mark_bytes} bytes in the last {now - self.mark_time:.0f} s "
                           f"({rate:.0f} bytes/s, below {MIN_RATE_ENV}={self.min_rate:g})")
        self.mark_time, self.mark_bytes = now, received


class _HeaderDeadline:
    """Shuts the connection down when the response headers have not all arrived within ``seconds``
    (the socket timeout only bounds each receive, and a server may send its headers a byte at a time)."""

    def __init__(self, seconds: float):
        self.sock = None
        self.fired = False
        self.seconds = seconds
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(OSError, AttributeError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def opener(self) -> urllib.request.OpenerDirector:
        deadline = self

        def watched(connection_class):
            class Connection(connection_class):
                def connect(self):
                    super().connect()
                    deadline.sock = self.sock

            return Connection

        class Http(urllib.request.HTTPHandler):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(watched(http_class), req, **kwargs)

        class Https(urllib.request.HTTPSHandler):
            def do_open(self, http_class, req, **kwargs):
                return super().do_open(watched(http_class), req, **kwargs)

        return urllib.request.build_opener(Http, Https)

    def open(self, request):
        self.timer.start()
        late = _Stalled(f"the server did not finish its response headers within {self.seconds:g} s")
        try:
            response = self.opener().open(request, timeout=self.seconds)
        except (OSError, http.client.HTTPException) as exc:
            if self.fired:
                raise late from exc
            raise
        finally:
            self.timer.cancel()
        if self.fired:  # the shutdown can also read as the end of the headers
            response.close()
            raise late
        return response


def _fetch_once(url: str, dest: Path, timeout: float, min_rate: float) -> None:
    # A unique partial file per attempt, in the cache folder: concurrent downloads never mix bytes,
    # and an interrupted one leaves nothing behind.
    fd, partial = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "flashdino"})
            with _HeaderDeadline(timeout).open(request) as response:
                expected = response.headers.get("Content-Length")
                received = 0
                total = int(expected) if expected is not None and expected.isdigit() else None
                guard = _RateGuard(timeout, min_rate)
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.split("-", 1)[-1], leave=False,
                          disable=not sys.stderr.isatty()) as bar:
                    # read1: whatever one receive brings (read(n) would wait for all n bytes, so a
                    # trickling server would never reach the rate check)
                    while chunk := response.read1(_CHUNK):
                        _write_local(out, chunk, dest)
                        received += len(chunk)
                        bar.update(len(chunk))
                        guard.update(received)
            if total is not None and received != total:
                raise ConnectionError(f"the connection closed after {received} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
        if received == 0:
            raise ConnectionError("the server sent an empty file")
        if total is None:  # no length to compare with: the file itself must prove it is whole
            why = completeness_problem(Path(partial))
            if why is not None:
                raise ConnectionError(f"the server sent no Content-Length and the {received} bytes received are not a "
                                      f"whole checkpoint ({why}); the connection was probably cut short")
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _write_local(out, chunk: bytes, dest: Path) -> None:
    # A full disk is not a network problem: no retry, and say where the space is missing.
    try:
        out.write(chunk)
    except OSError as exc:
        raise WeightsUnavailableError(f"cannot write the download to {dest.parent}: {exc.strerror or exc}; free some "
                                      "space or point TORCH_HOME to another folder") from exc


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (408, 429, 500, 502, 503, 504)
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError,
                            http.client.HTTPException))  # e.g. IncompleteRead, a garbled status line


def download_url(url: str) -> Path:
    """Downloads a checkpoint URL into the torch hub cache (once) and returns the local path."""
    dest = url_cache_path(url)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    if offline():
        raise WeightsUnavailableError(
            f"{url} is not in the download cache ({dest}) and offline mode is on ({OFFLINE_ENV} / HF_HUB_OFFLINE): "
            f"download it on a machine with network access and pass weights=PATH, or place it at {dest}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailableError(f"cannot create the download cache folder {dest.parent}: {exc.strerror or exc}; "
                                      "set TORCH_HOME to a writable folder, or pass weights=PATH") from exc
    timeout, retries, min_rate = download_timeout(), download_retries(), download_min_rate()
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, dest, timeout, min_rate)
            return dest
        except urllib.error.HTTPError as exc:
            if attempt < retries and _retryable(exc):
                time.sleep(min(0.5 * 2 ** attempt, 4.0))
                continue
            raise WeightsUnavailableError(_http_advice(url, exc, dest)) from exc
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            if attempt < retries and _retryable(exc):
                time.sleep(min(0.5 * 2 ** attempt, 4.0))
                continue
            reason = getattr(exc, "reason", None) or exc
            raise WeightsUnavailableError(
                f"cannot download {url} after {attempt + 1} attempt(s) ({type(exc).__name__}: {reason}); you may be "
                f"offline, or the server does not answer ({_settings_hint()}). Download the file on a machine with "
                f"network access and pass weights=PATH, or place it at {dest}"
            ) from exc
    raise AssertionError("unreachable")


def _http_advice(url: str, exc: "urllib.error.HTTPError", dest: Path) -> str:
    if exc.code in (401, 403):
        return (f"access to {url} was refused (HTTP {exc.code}). Meta's DINOv3 .pth links must be the signed "
                "URLs from the access form (https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/); "
                "or use the Hugging Face weights (e.g. weights='facebook/dinov3-vits16-pretrain-lvd1689m' after "
                "requesting access and `hf auth login`), or pass weights=PATH to a downloaded file")
    return (f"downloading {url} failed (HTTP {exc.code}: {exc.reason}); download the file manually and pass "
            f"weights=PATH, or place it at {dest}")


# ------------------------------------------------------------------------------------- the hub


def _hub_advice(repo_id: str) -> str:
    return (f"request access at https://huggingface.co/{repo_id} (DINOv3 weights are gated), "
            "log in with `hf auth login` (or set HF_TOKEN), or download the files elsewhere and pass "
            "weights=PATH to the folder or file")


def _is_connection_error(exc: BaseException) -> bool:
    names = " ".join(c.__name__ for c in type(exc).__mro__)
    return any(word in names for word in ("Connect", "Timeout", "Network", "Transport", "Offline", "Proxy"))


def hub_error(exc: BaseException, repo_id: str, filename: str) -> Exception:
    """A WeightsUnavailableError explaining a failed hub download."""
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, hf_errors.GatedRepoError):
        msg = f"{repo_id} is a gated repository and this account has no access yet: {_hub_advice(repo_id)}"
    elif isinstance(exc, hf_errors.LocalEntryNotFoundError):
        msg = (f"{repo_id}/{filename} is not in the local Hugging Face cache and the hub cannot be reached "
               f"(offline, or HF_HUB_OFFLINE=1): connect to the network, or run `hf download {repo_id}` on a "
               "machine that can and copy the cache, or pass weights=PATH to a downloaded folder or file")
    elif status in (401, 403):
        msg = f"access to {repo_id} was refused (HTTP {status}): {_hub_advice(repo_id)}"
    elif isinstance(exc, hf_errors.RepositoryNotFoundError):
        msg = (f"{repo_id} was not found on the Hugging Face hub, or it is private/gated and this request was "
               f"not authenticated: check the id, then {_hub_advice(repo_id)}")
    elif isinstance(exc, hf_errors.RevisionNotFoundError):
        msg = f"revision not found in {repo_id}: {first}"
    elif isinstance(exc, hf_errors.EntryNotFoundError):
        msg = f"{repo_id} has no file {filename}: it is not a DINOv2/DINOv3 model repository in transformers format"
    elif isinstance(exc, (ConnectionError, TimeoutError)) or _is_connection_error(exc):
        msg = (f"cannot reach the Hugging Face hub to download {repo_id}/{filename} ({type(exc).__name__}: {first}): "
               f"check the network or proxy, or pass weights=PATH to a downloaded folder or file ({_settings_hint()})")
    else:
        msg = f"downloading {repo_id}/{filename} failed ({type(exc).__name__}: {first}); {_hub_advice(repo_id)}"
    return WeightsUnavailableError(msg)


def _remote_missing(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    remote = getattr(hf_errors, "RemoteEntryNotFoundError", None)
    if remote is not None:
        return isinstance(exc, remote)
    return isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(exc, hf_errors.LocalEntryNotFoundError)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def probe(url: str, timeout: float) -> Optional[str]:
    """None when a server answers ``url`` at all (any HTTP status), else why not (one attempt)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, ssl.SSLError):
            return None  # it answered; certificates are the hub client's business (its own CA settings)
        return f"{type(reason).__name__ if not isinstance(reason, str) else 'URLError'}: {reason}"


class _Hub:
    """Downloads of one repository, with one reachability check and the timeouts above."""

    def __init__(self, repo_id: str, revision: Optional[str] = None):
        try:
            import huggingface_hub
        except ImportError as exc:  # pragma: no cover - a dependency
            raise WeightsUnavailableError(
                f"loading {repo_id} needs huggingface_hub (pip install huggingface_hub), or pass weights=PATH"
            ) from exc
        self.hub, self.repo_id, self.revision = huggingface_hub, repo_id, revision
        self.endpoint = hub_endpoint()
        self.local_only = offline()
        self.unreachable: Optional[str] = None
        if not self.local_only:
            self.unreachable = probe(f"{self.endpoint}/api/models/{repo_id}", download_timeout())
            self.local_only = self.unreachable is not None

    def fetch(self, filename: str, optional: bool = False) -> Optional[str]:
        try:
            return self.hub.hf_hub_download(self.repo_id, filename, revision=self.revision, endpoint=self.endpoint,
                                            etag_timeout=download_timeout(), local_files_only=self.local_only)
        except Exception as exc:  # noqa: BLE001 - translated below
            if optional and _remote_missing(exc):
                return None
            if self.unreachable is not None:
                raise WeightsUnavailableError(
                    f"the Hugging Face hub ({self.endpoint}) does not answer ({self.unreachable}) and "
                    f"{self.repo_id}/{filename} is not in the local cache: check the network or proxy, or pass "
                    f"weights=PATH to a downloaded folder or file ({_settings_hint()})") from exc
            if self.local_only and optional:
                return None
            raise hub_error(exc, self.repo_id, filename) from exc


def download_hub(repo_id: str, revision: Optional[str] = None) -> Path:
    """Downloads config.json, the weights and preprocessor_config.json; returns the snapshot folder."""
    hub = _Hub(repo_id, revision)
    config_path = hub.fetch(CONFIG_NAME)
    weights = hub.fetch(WEIGHTS_NAME, optional=True)
    if weights is None:
        index = hub.fetch(WEIGHTS_INDEX_NAME, optional=True)
        if index is None:
            where = "in the local cache (offline mode)" if hub.local_only else "on the hub"
            raise WeightsUnavailableError(f"{repo_id} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} {where}; "
                                          "pass weights=PATH to a downloaded folder or file")
        for shard in shard_names(Path(index)):
            hub.fetch(shard)
    hub.fetch(PREPROCESSOR_NAME, optional=True)
    return Path(config_path).parent


def download_hub_file(repo_id: str, names: Sequence[str]) -> Path:
    """The first of ``names`` that the repository has (e.g. ``model.safetensors``, then ``model.pt``)."""
    hub = _Hub(repo_id)
    for i, name in enumerate(names):
        path = hub.fetch(name, optional=i < len(names) - 1)
        if path is not None:
            return Path(path)
    raise AssertionError("unreachable")  # the last name is not optional
