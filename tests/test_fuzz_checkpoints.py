"""Fuzzing the loaders with damaged safetensors / .pth files, config.json and shard indexes.

Whatever the bytes, loading must end in a documented error (:class:`CheckpointError`) or a model,
never a raw exception, never run code from the file, and stay within bounded time and memory.
"""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import flashdino
from flashdino.loading import CheckpointError

transformers = pytest.importorskip("transformers")

TINY = dict(embed_dim=64, depth=1, num_heads=2)
SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PER_EXAMPLE_S = 10.0
MAX_RSS_GROWTH_KB = 1_500_000


class Trap:
    """Unpickling this would create a marker file: proof that code from a checkpoint ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_originals")
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=2, num_register_tokens=4, image_size=32)
    hf = root / "hf"
    transformers.DINOv3ViTModel(cfg).save_pretrained(hf)
    model = flashdino.from_pretrained(hf)
    torch.save(model.state_dict(), root / "model.pth")
    flashdino.convert(model.state_dict(), root / "flashdino.safetensors", model=model)
    return {"hf": hf, "pth": root / "model.pth", "st": root / "flashdino.safetensors"}


def _attempt(load, marker: Path):
    start = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load()
    except CheckpointError as exc:
        assert str(exc) and "Traceback" not in str(exc)
    assert not marker.exists(), "code from a checkpoint was executed"
    assert time.perf_counter() - start < PER_EXAMPLE_S
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < MAX_RSS_GROWTH_KB


# byte-level damage, biased towards the headers where the structure lives
edits = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "zero"]), st.integers(0, 4096),
                           st.binary(min_size=1, max_size=16)), min_size=1, max_size=4)


def _damage(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, pos, blob in ops:
        pos = pos % max(len(buf), 1)
        if op == "flip":
            buf[pos:pos + len(blob)] = bytes(b ^ x for b, x in zip(buf[pos:pos + len(blob)], blob))
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = blob
        else:
            buf[pos:pos + len(blob)] = bytes(len(blob))
    return bytes(buf)


@SETTINGS
@given(ops=edits, kind=st.sampled_from(["pth", "st"]))
def test_damaged_weight_files(originals, tmp_path, ops, kind):
    path = tmp_path / f"damaged.{'pth' if kind == 'pth' else 'safetensors'}"
    path.write_bytes(_damage(originals[kind].read_bytes(), ops))
    marker = tmp_path / "executed"
    _attempt(lambda: flashdino.create_model("dinov3_vits16", weights=path, **TINY), marker)
    _attempt(lambda: flashdino.from_pretrained(path), marker)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) |
    st.sampled_from(["", "gelu", "relu", "silu", "bert", "dinov3_vit", "../x", "1e9"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
config_keys = st.sampled_from(["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "hidden_act", "layer_norm_eps", "rope_theta", "query_bias",
                               "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp",
                               "num_register_tokens", "patch_size", "image_size", "num_channels",
                               "layerscale_value"])


@SETTINGS
@given(changes=st.dictionaries(config_keys, json_values, min_size=1, max_size=4),
       drop=st.lists(config_keys, max_size=2))
def test_mutated_config_json(originals, tmp_path, changes, drop):
    folder = tmp_path / "hf"
    shutil.copytree(originals["hf"], folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "executed"
    _attempt(lambda: flashdino.from_pretrained(folder), marker)
    _attempt(lambda: flashdino.create_model("dinov3_vits16", weights=folder, **TINY), marker)


shard_values = st.one_of(st.sampled_from(["a.safetensors", "b.safetensors", "../a.safetensors", "/etc/passwd",
                                          "sub/a.safetensors", "", ".", "a.safetensors\x00"]),
                         json_values)


@SETTINGS
@given(values=st.lists(shard_values, min_size=1, max_size=4), raw=st.booleans(), junk=st.binary(max_size=64))
def test_mutated_shard_index(originals, tmp_path, values, raw, junk):
    from safetensors.torch import load_file

    folder = tmp_path / "sharded"
    folder.mkdir(exist_ok=True)
    shutil.copy(originals["hf"] / "config.json", folder / "config.json")
    sd = load_file(str(originals["hf"] / "model.safetensors"))
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(folder / "a.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(folder / "b.safetensors"))
    weight_map = {k: ("a.safetensors" if i % 2 == 0 else "b.safetensors") for i, k in enumerate(keys)}
    for i, value in enumerate(values):
        weight_map[keys[i % len(keys)]] = value
    index = folder / "model.safetensors.index.json"
    index.write_bytes(junk if raw else json.dumps({"weight_map": weight_map}).encode())
    _attempt(lambda: flashdino.from_pretrained(folder), tmp_path / "executed")


header_values = st.one_of(
    st.sampled_from(["F32", "BF16", "I8", "BOOL", "C64", "F8_E4M3", "U64", "XX"]),
    st.lists(st.integers(-1, 2**40), max_size=4), json_values)


@SETTINGS
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=header_values, which=st.integers(0, 50),
       metadata=st.dictionaries(st.sampled_from(["format", "config", "variant"]),
                                st.sampled_from(["flashdino", "{}", "[1]", '{"depth": 1e9}', "dinov3_vits16",
                                                 '{"name": "x", "family": "dinov3", "embed_dim": 65536}']),
                                max_size=3))
def test_mutated_safetensors_header(originals, tmp_path, field, value, which, metadata):
    data = originals["st"].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    header[names[which % len(names)]][field] = value
    if metadata:
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    blob = json.dumps(header).encode()
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    marker = tmp_path / "executed"
    _attempt(lambda: flashdino.from_pretrained(path), marker)
    _attempt(lambda: flashdino.create_model("dinov3_vits16", weights=path, **TINY), marker)


def test_pickles_that_would_run_code_never_do(tmp_path):
    marker = tmp_path / "executed"
    for protocol in (2, 4, 5):
        raw = tmp_path / f"raw{protocol}.pth"
        raw.write_bytes(pickle.dumps({"cls_token": Trap(str(marker))}, protocol=protocol))
        _attempt(lambda: flashdino.create_model("dinov3_vits16", weights=raw, **TINY), marker)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {"cls_token": Trap(str(marker))}}, wrapped)
    _attempt(lambda: flashdino.create_model("dinov3_vits16", weights=wrapped, **TINY), marker)
    assert not marker.exists()
