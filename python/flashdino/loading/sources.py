"""Turning a ``weights=`` argument into tensors: files, folders, tags, URLs, hub ids, dicts.

Downloads go through ``huggingface_hub.hf_hub_download`` (its cache) and
``torch.hub.download_url_to_file`` (into ``torch.hub.get_dir()/checkpoints``). Failures that the
user can fix (gated repository, no login, offline, missing file) become
:class:`WeightsUnavailableError` with the fix spelled out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from .errors import CheckpointError, WeightsUnavailableError
from .files import read_state_dict, unwrap_state_dict

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # read_state_dict reports unreadable files
        return {}


def read_folder(folder: Path) -> Source:
    from .hf import WEIGHTS_NAME, read_hf_folder_raw

    flashdino_files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() and len(flashdino_files) == 1:
        path = flashdino_files[0]
        return Source(read_state_dict(path), str(path), metadata=_safetensors_metadata(path))
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
    s = os.fspath(source)
    path = Path(s).expanduser()
    if path.is_dir():
        return read_folder(path)
    if path.is_file():
        return Source(read_state_dict(path), str(path), metadata=_safetensors_metadata(path))
    tag = next((t for t in weight_tags if t.lower() == s.lower()), None)  # "lvd1689m" or "LVD1689M"
    if tag is not None:
        return resolve(weight_tags[tag], weight_tags, model_name)
    if is_url(s):
        local = download_url(s)
        return Source(read_state_dict(local), str(local))
    if is_hub_id(s):
        return read_folder(download_hub(s))
    tags = f"; weights tags of {model_name}: {', '.join(sorted(weight_tags))}" if weight_tags else ""
    raise CheckpointError(f"checkpoint not found: {s} (not a file, a folder, a URL or a hub id 'org/name'){tags}")


# ---------------------------------------------------------------------------------------------------


def _hub_advice(repo_id: str) -> str:
    return (f"request access at https://huggingface.co/{repo_id} (DINOv3 weights are gated), "
            "log in with `hf auth login` (or set HF_TOKEN), or download the files elsewhere and pass "
            "weights=PATH to the folder or file")


def _is_connection_error(exc: BaseException) -> bool:
    names = " ".join(c.__name__ for c in type(exc).__mro__)
    return any(word in names for word in ("Connect", "Timeout", "Network", "Transport", "Offline", "Proxy"))


def hub_error(exc: BaseException, repo_id: str, filename: str) -> Exception:
    """A WeightsUnavailableError (or CheckpointError) explaining a failed hub download."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover
        hf_errors = None
    status = getattr(getattr(exc, "response", None), "status_code", None)
    cls = lambda name: getattr(hf_errors, name, ()) if hf_errors else ()  # noqa: E731
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if cls("GatedRepoError") and isinstance(exc, cls("GatedRepoError")):
        msg = f"{repo_id} is a gated repository and this account has no access yet: {_hub_advice(repo_id)}"
    elif cls("LocalEntryNotFoundError") and isinstance(exc, cls("LocalEntryNotFoundError")):
        msg = (f"{repo_id}/{filename} is not in the local Hugging Face cache and the hub cannot be reached "
               f"(offline, or HF_HUB_OFFLINE=1): connect to the network, or run `hf download {repo_id}` on a "
               "machine that can and copy the cache, or pass weights=PATH to a downloaded folder or file")
    elif status in (401, 403):
        msg = f"access to {repo_id} was refused (HTTP {status}): {_hub_advice(repo_id)}"
    elif cls("RepositoryNotFoundError") and isinstance(exc, cls("RepositoryNotFoundError")):
        msg = (f"{repo_id} was not found on the Hugging Face hub, or it is private/gated and this request was "
               f"not authenticated: check the id, then {_hub_advice(repo_id)}")
    elif cls("RevisionNotFoundError") and isinstance(exc, cls("RevisionNotFoundError")):
        msg = f"revision not found in {repo_id}: {first}"
    elif cls("EntryNotFoundError") and isinstance(exc, cls("EntryNotFoundError")):
        msg = f"{repo_id} has no file {filename}: it is not a DINOv2/DINOv3 model repository in transformers format"
    elif isinstance(exc, (ConnectionError, TimeoutError)) or _is_connection_error(exc):
        msg = (f"cannot reach the Hugging Face hub to download {repo_id}/{filename} ({type(exc).__name__}: {first}): "
               "check the network or proxy, or pass weights=PATH to a downloaded folder or file")
    else:
        msg = f"downloading {repo_id}/{filename} failed ({type(exc).__name__}: {first}); {_hub_advice(repo_id)}"
    return WeightsUnavailableError(msg)


def _remote_missing(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    remote = getattr(hf_errors, "RemoteEntryNotFoundError", None)
    if remote is not None:
        return isinstance(exc, remote)
    return isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(exc, hf_errors.LocalEntryNotFoundError)


def download_hub(repo_id: str, revision: Optional[str] = None) -> Path:
    """Downloads config.json, the weights and preprocessor_config.json; returns the snapshot folder."""
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover
        raise WeightsUnavailableError(
            f"loading {repo_id} needs huggingface_hub (pip install huggingface_hub), or pass weights=PATH"
        ) from exc

    def fetch(filename: str, optional: bool = False) -> Optional[str]:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)
        except Exception as exc:  # noqa: BLE001 - translated below
            if optional and _remote_missing(exc):
                return None
            raise hub_error(exc, repo_id, filename) from exc

    config_path = fetch("config.json")
    weights = fetch("model.safetensors", optional=True)
    if weights is None:
        index = fetch("model.safetensors.index.json", optional=True)
        if index is None:
            raise WeightsUnavailableError(f"{repo_id} has neither model.safetensors nor model.safetensors.index.json")
        import json

        try:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from exc
        for shard in shards:
            fetch(shard)
    fetch("preprocessor_config.json", optional=True)
    return Path(config_path).parent


def download_url(url: str) -> Path:
    """Downloads a checkpoint URL into the torch hub cache (once) and returns the local path."""
    import urllib.error

    import torch

    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    dest = folder / name
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            msg = (f"access to {url} was refused (HTTP {exc.code}). Meta's DINOv3 .pth links must be the signed "
                   "URLs from the access form (https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/); "
                   "or use the Hugging Face weights (e.g. weights='facebook/dinov3-vits16-pretrain-lvd1689m' after "
                   f"requesting access and `hf auth login`), or pass weights=PATH to a downloaded file")
        else:
            msg = (f"downloading {url} failed (HTTP {exc.code}: {exc.reason}); download the file manually and pass "
                   f"weights=PATH, or place it at {dest}")
        raise WeightsUnavailableError(msg) from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsUnavailableError(
            f"cannot download {url} ({type(exc).__name__}: {exc}); you may be offline. Download the file on a "
            f"machine with network access and pass weights=PATH, or place it at {dest}"
        ) from exc
    if not dest.is_file() or dest.stat().st_size == 0:
        raise WeightsUnavailableError(f"downloading {url} produced no file at {dest}; pass weights=PATH instead")
    return dest
