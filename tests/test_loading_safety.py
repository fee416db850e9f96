"""Loading that never hurts: configs checked against variants and tensors before any allocation,
absurd sizes refused, no path escape through shard indexes, honest file labels, bounded downloads.

Each test reproduces a defect of the reliability probe (issue 16 / 17) on a tiny model.
"""

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import flashdino
from flashdino import factory
from flashdino.loading import CheckpointError, WeightsUnavailableError, canonical_shapes
from flashdino.loading import sources
from flashdino.models import build_model
from _servers import serve, silent_server

transformers = pytest.importorskip("transformers")

TINY = dict(embed_dim=64, depth=1, num_heads=2)


def hf_folder(tmp_path, name="hf", **changes):
    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
               num_register_tokens=4, image_size=32)
    cfg.update(changes)
    folder = tmp_path / name
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)).save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def no_build(monkeypatch):
    def refuse(cfg):
        raise AssertionError(f"a model was built for {cfg.name} before the checkpoint was checked")

    monkeypatch.setattr(factory, "build_model", refuse)


# ------------------------------------------------------------------------- the layout table is the model


@pytest.mark.parametrize("name,overrides", [
    *[(n, {}) for n in sorted(flashdino.VARIANTS)],
    ("dinov3_vits16", dict(untie_cls_and_patch_norms=True, local_cls_norm=True, qkv_bias=False)),
    ("dinov3_vits16plus", dict(ffn_bias=False, proj_bias=False, n_storage_tokens=0)),
    ("dinov2_vits14", dict(layerscale_init=0.0, img_size=98)),
])
def test_layout_table_equals_the_model_state_dict(name, overrides):
    cfg = flashdino.get_config(name, **overrides)
    with torch.device("meta"):
        model = build_model(cfg)
    assert canonical_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------- config.json against the variant


def test_config_heads_differing_from_the_variant_are_refused(tmp_path, monkeypatch):
    folder = hf_folder(tmp_path, num_attention_heads=4)
    assert flashdino.from_pretrained(folder).num_heads == 4
    no_build(monkeypatch)
    with pytest.raises(CheckpointError, match="num_attention_heads = 4 but dinov3_vits16 has num_heads = 2") as info:
        flashdino.dinov3_vits16(weights=folder, **TINY)
    assert "from_pretrained" in str(info.value)


@pytest.mark.parametrize("change,field", [
    (dict(model_type="bert"), "model_type 'bert'"),
    (dict(hidden_act="relu"), "hidden_act 'relu'"),
    (dict(layer_norm_eps=1e-3), "layer_norm_eps = 0.001"),
    (dict(mlp_bias=False), "mlp_bias = False"),
])
def test_every_config_field_is_checked_with_a_model_name(tmp_path, change, field):
    folder = hf_folder(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=field):
        flashdino.create_model("dinov3_vits16", weights=folder, **TINY)


def test_stored_flashdino_config_is_checked_against_the_variant(tmp_path):
    src = flashdino.create_model("dinov3_vits16", layer_norm_eps=1e-3, **TINY)
    out = flashdino.convert(src.state_dict(), tmp_path / "m.safetensors", model=src)
    with pytest.raises(CheckpointError, match="layer_norm_eps = 0.001 but dinov3_vits16 has 1e-05"):
        flashdino.create_model("dinov3_vits16", weights=out, **TINY)
    assert flashdino.from_pretrained(out).cfg.layer_norm_eps == 1e-3


# ------------------------------------------------------------------------- tensors and sizes


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.int64])
def test_non_floating_tensors_are_refused_by_name(tmp_path, dtype):
    sd = flashdino.create_model("dinov3_vits16", **TINY).state_dict()
    sd["norm.weight"] = torch.ones(64).to(dtype)
    with pytest.raises(CheckpointError, match=r"non-floating tensors: norm\.weight"):
        flashdino.create_model("dinov3_vits16", weights=sd, **TINY)
    with pytest.raises(CheckpointError, match=r"norm\.weight"):
        flashdino.convert(sd, tmp_path / "x.safetensors", model="dinov3_vits16", **TINY)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("change,field", [
    (dict(num_hidden_layers=10**9), "num_hidden_layers = 1000000000"),
    (dict(hidden_size=65536, num_attention_heads=64), "hidden_size = 65536"),
    (dict(num_hidden_layers=1e9), "'num_hidden_layers' must be int"),
    (dict(num_register_tokens=10**12), "num_register_tokens = 1000000000000"),
    (dict(image_size=[10**9, 10**9]), "image_size = 1000000000"),
])
def test_absurd_configs_are_refused_naming_the_field(tmp_path, monkeypatch, change, field):
    folder = hf_folder(tmp_path)
    edit_config(folder, **change)
    no_build(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=field):
        flashdino.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=field):
        flashdino.convert(folder, tmp_path / "out.safetensors")
    assert time.perf_counter() - start < 10


def test_config_bigger_than_its_tensors_is_refused_before_allocation(tmp_path, monkeypatch):
    folder = hf_folder(tmp_path)
    edit_config(folder, hidden_size=4096, num_attention_heads=32, num_hidden_layers=40)
    no_build(monkeypatch)
    with pytest.raises(CheckpointError, match="config.json describes embed 4096, 40 blocks.* but the weights are "
                                              "embed 64, 1 blocks"):
        flashdino.from_pretrained(folder)


def test_override_types_name_field_value_and_type():
    with pytest.raises(ValueError, match=r"depth = 'two' \(str\) must be an integer"):
        flashdino.get_config("small", depth="two")
    with pytest.raises(ValueError, match=r"qkv_bias = 'yes' \(str\) must be true or false"):
        flashdino.get_config("small", qkv_bias="yes")
    with pytest.raises(ValueError, match=r"depth = 100000 is outside the supported range"):
        flashdino.create_model("small", depth=100_000)


@pytest.mark.parametrize("field, value", [
    ("depth", 0), ("depth", -2), ("embed_dim", 0), ("num_heads", 0), ("patch_size", 0), ("patch_size", -16),
    ("in_chans", 0), ("img_size", 0), ("n_storage_tokens", -1), ("ffn_ratio", 0.0), ("ffn_ratio", -4.0),
    ("layer_norm_eps", 0.0), ("rope_base", 0.0), ("swiglu_align", 0),
])
def test_sizes_that_build_no_model_are_refused_with_the_fix(field, value):
    # One rule in the variant table: the Python entry points and `--override` (tests/test_cli.py) share it.
    import re

    pattern = rf"dinov3_vits16: {field} = {re.escape(repr(value))} .*; set {field} to a value"
    with pytest.raises(ValueError, match=pattern):
        flashdino.get_config("small", **{field: value})
    with pytest.raises(ValueError, match=pattern):
        flashdino.dinov3_vits16(**{field: value})


def test_derived_sizes_that_build_no_model_are_refused():
    with pytest.raises(ValueError, match="ffn_ratio 0.001 gives an MLP of 0 hidden units.*raise ffn_ratio"):
        flashdino.get_config("small", ffn_ratio=0.001)
    with pytest.raises(ValueError, match="img_size 10 is smaller than patch_size 14.*set img_size >= 14"):
        flashdino.get_config("dinov2_vits14", img_size=10)
    with pytest.raises(ValueError, match="not divisible by num_heads 6; set embed_dim to a multiple of num_heads"):
        flashdino.get_config("small", embed_dim=64)
    assert flashdino.get_config("small", depth=1, n_storage_tokens=0).depth == 1  # the smallest sizes still build


def test_missing_weights_are_reported_before_the_model_is_built(monkeypatch):
    no_build(monkeypatch)
    monkeypatch.setenv("FLASHDINO_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="nor is missing/path a local file or folder"):
        flashdino.create_model("large", weights="missing/path")  # "org/name" may be a hub id
    with pytest.raises(CheckpointError, match="checkpoint not found: missing/dir/file.pth"):
        flashdino.create_model("large", weights="missing/dir/file.pth")


# ------------------------------------------------------------------------- sharded folders


def sharded_folder(tmp_path):
    folder = hf_folder(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(folder / "a.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(folder / "b.safetensors"))
    index = {"metadata": {}, "weight_map": {**{k: "a.safetensors" for k in keys[:half]},
                                            **{k: "b.safetensors" for k in keys[half:]}}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, index


@pytest.mark.parametrize("bad", ["../outside.safetensors", "ABS", "sub/a.safetensors", 7, None, ["a"], ".."])
def test_shard_index_entries_must_be_plain_names_in_the_folder(tmp_path, bad):
    folder, index = sharded_folder(tmp_path)
    assert flashdino.from_pretrained(folder).n_blocks == 1  # the valid index loads
    outside = tmp_path / "outside.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 64)}, str(outside))
    if bad == "ABS":
        bad = str(outside)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = bad
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"weight_map\[.*(not a plain file name|must be a file name)"):
        flashdino.from_pretrained(folder)


# ------------------------------------------------------------------------- what a file is


def test_files_are_labelled_by_content(tmp_path):
    sd = {"cls_token": torch.zeros(1, 1, 64)}
    cases = {
        "raw.pkl": (pickle.dumps(sd, protocol=4), "bare Python pickle (protocol 4)"),
        "image.pth": (Path(flashdino.__file__).parent.joinpath("assets", "sample.png").read_bytes(), "a PNG image"),
        "page.bin": (b"<!DOCTYPE html><html><body>Access denied</body></html>", "HTML"),
        "lfs.safetensors": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "Git LFS pointer"),
    }
    for name, (data, label) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            flashdino.create_model("dinov3_vits16", weights=tmp_path / name, **TINY)
        msg = str(info.value)
        assert label in msg and "truncated or corrupt" not in msg and "weights_only" not in msg, msg
    # a safetensors file named .pth is read by its content
    model = flashdino.create_model("dinov3_vits16", **TINY)
    save_file(model.state_dict(), str(tmp_path / "really_safetensors.pth"))
    assert flashdino.load_weights(model, tmp_path / "really_safetensors.pth").ok


# ------------------------------------------------------------------------- downloads


@pytest.fixture
def fast_network(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDINO_DOWNLOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("FLASHDINO_DOWNLOAD_RETRIES", "1")
    monkeypatch.delenv("FLASHDINO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _pth_bytes(model, tmp_path, name="w.pth") -> bytes:
    torch.save(model.state_dict(), tmp_path / name)
    return (tmp_path / name).read_bytes()


def test_url_downloads_are_cached_by_the_whole_url(tmp_path, fast_network):
    a = flashdino.create_model("dinov3_vits16", **TINY)
    b = flashdino.create_model("dinov3_vits16", **TINY)
    routes = {"/one/w.pth": (200, _pth_bytes(a, tmp_path, "a.pth")), "/two/w.pth": (200, _pth_bytes(b, tmp_path, "b.pth"))}
    with serve(routes) as (base, requested):
        for _ in range(2):
            got_a = flashdino.create_model("dinov3_vits16", weights=f"{base}/one/w.pth", **TINY)
            got_b = flashdino.create_model("dinov3_vits16", weights=f"{base}/two/w.pth", **TINY)
        assert torch.equal(got_a.cls_token, a.cls_token) and torch.equal(got_b.cls_token, b.cls_token)
        assert sorted(requested) == ["/one/w.pth", "/two/w.pth"]  # each downloaded once
    assert len(list(fast_network.glob("*w.pth"))) == 2
    assert not list(fast_network.glob("*.partial"))


def test_a_server_that_never_answers_fails_within_the_timeout(fast_network):
    with silent_server() as base:
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="FLASHDINO_DOWNLOAD_TIMEOUT") as info:
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.pth", **TINY)
        elapsed = time.perf_counter() - start
    assert elapsed < 5, elapsed  # 2 attempts x 0.5 s + a short pause, not minutes
    assert "2 attempt(s)" in str(info.value)
    assert not list(fast_network.glob("*.partial")) and not list(fast_network.glob("*w.pth"))


def test_http_errors_are_not_retried_and_explain_the_fix(fast_network):
    with serve({"/secret.pth": (403, b"denied")}) as (base, requested):
        with pytest.raises(WeightsUnavailableError, match="HTTP 403.*signed"):
            flashdino.create_model("dinov3_vits16", weights=f"{base}/secret.pth", **TINY)
        assert requested == ["/secret.pth"]


def test_offline_mode_fails_at_once_for_urls_and_hub_ids(fast_network, monkeypatch):
    monkeypatch.setenv("FLASHDINO_OFFLINE", "1")
    with silent_server() as base:
        monkeypatch.setenv("HF_ENDPOINT", base)
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="offline mode"):
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.pth", **TINY)
        with pytest.raises(WeightsUnavailableError, match="not in the local Hugging Face cache"):
            flashdino.from_pretrained("some-org/some-model")
        assert time.perf_counter() - start < 1.0


def test_a_hub_that_never_answers_fails_within_the_timeout(fast_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with silent_server() as base:
        monkeypatch.setenv("HF_ENDPOINT", base)
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="does not answer.*FLASHDINO_DOWNLOAD_TIMEOUT"):
            flashdino.from_pretrained("some-org/some-model")
        assert time.perf_counter() - start < 5


def test_hub_reachability_probe_accepts_any_http_answer():
    with serve({}) as (base, _):
        assert sources.probe(f"{base}/api/models/x/y", 1.0) is None  # a 404 is an answer
    with silent_server() as base:
        assert "timed out" in sources.probe(base, 0.2)


# ------------------------------------------------------------------------- random weights


def test_random_weights_warn_once_with_their_own_class():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flashdino.dinov3_vits16(depth=1)
    random_warnings = [w for w in caught if issubclass(w.category, flashdino.RandomWeightsWarning)]
    assert len(random_warnings) == 1
    assert issubclass(flashdino.RandomWeightsWarning, UserWarning)
    assert random_warnings[0].filename == __file__  # points at the caller, not at flashdino
    assert "dinov3_vits16" in str(random_warnings[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = flashdino.create_model("dinov3_vits16", **TINY).state_dict()
        caught.clear()
        flashdino.create_model("dinov3_vits16", weights=sd, **TINY)
    assert not [w for w in caught if issubclass(w.category, flashdino.RandomWeightsWarning)]


def test_training_only_fields_do_not_block_hf_weights(tmp_path):
    # SAT / 7B variants carry local_cls_norm (training only); HF folders of them do not.
    folder = hf_folder(tmp_path, image_size=224)
    model = flashdino.create_model("dinov3_vitl16_sat493m", weights=folder, **TINY)
    assert model.cfg.local_cls_norm and torch.equal(model.local_cls_norm.weight, torch.ones(64))


# ------------------------------------------------------------------------- downloads that never end or end early


def test_a_trickling_server_fails_within_the_rate_window(fast_network, monkeypatch):
    """1 byte a second never trips the idle timeout; the minimum rate over the window does."""
    from _servers import raw_server, trickle

    monkeypatch.setenv("FLASHDINO_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setenv("FLASHDINO_DOWNLOAD_RETRIES", "0")
    with raw_server(trickle(b"x" * 10_000, 0.2)) as (base, conns):
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="bytes/s, below FLASHDINO_DOWNLOAD_MIN_RATE=1024") as info:
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.pth", **TINY)
        elapsed = time.perf_counter() - start
    assert elapsed < 4, elapsed  # one window of 1 s (+ one read), not the 2000 s the trickle would take
    assert "FLASHDINO_DOWNLOAD_MIN_RATE" in str(info.value) and len(conns) == 1
    assert not list(fast_network.glob("*"))


def test_min_rate_zero_switches_the_rate_check_off(fast_network, monkeypatch):
    from _servers import raw_server, trickle

    monkeypatch.setenv("FLASHDINO_DOWNLOAD_TIMEOUT", "0.3")
    monkeypatch.setenv("FLASHDINO_DOWNLOAD_MIN_RATE", "0")
    monkeypatch.setenv("FLASHDINO_DOWNLOAD_RETRIES", "0")
    model = flashdino.create_model("dinov3_vits16", depth=1, embed_dim=32, num_heads=2)
    body = _safetensors_bytes(model)
    with raw_server(trickle(body, 0.0001)) as (base, _):  # slow in bytes/s but never idle for 0.3 s
        got = flashdino.create_model("dinov3_vits16", weights=f"{base}/w.safetensors", depth=1, embed_dim=32, num_heads=2)
    assert torch.equal(got.cls_token, model.cls_token)


def _safetensors_bytes(model) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_a_download_cut_short_without_length_is_not_cached(fast_network, tmp_path, fmt):
    from _servers import raw_server, cut_short

    model = flashdino.create_model("dinov3_vits16", **TINY)
    if fmt == "safetensors":
        body = _safetensors_bytes(model)
    else:
        torch.save(model.state_dict(), tmp_path / "w.pth", _use_new_zipfile_serialization=fmt == "zip")
        body = (tmp_path / "w.pth").read_bytes()
    with raw_server(cut_short(body, len(body) * 2 // 3)) as (base, conns):
        with pytest.raises(WeightsUnavailableError, match="no Content-Length.*not a whole checkpoint"):
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.bin", **TINY)
        assert len(conns) == 2  # a cut is retried (FLASHDINO_DOWNLOAD_RETRIES=1)
    assert not list(fast_network.glob("*")), "a truncated download must not enter the cache"
    # the whole file without a length is accepted and cached
    with raw_server(cut_short(body, len(body))) as (base, conns):
        got = flashdino.create_model("dinov3_vits16", weights=f"{base}/w.bin", **TINY)
        assert torch.equal(got.cls_token, model.cls_token)
        again = flashdino.create_model("dinov3_vits16", weights=f"{base}/w.bin", **TINY)
        assert len(conns) == 1 and torch.equal(again.cls_token, model.cls_token)
    assert len(list(fast_network.glob("*w.bin"))) == 1


@pytest.mark.parametrize("name,value,match", [
    ("FLASHDINO_DOWNLOAD_TIMEOUT", "soon", "FLASHDINO_DOWNLOAD_TIMEOUT='soon' is not a finite number"),
    ("FLASHDINO_DOWNLOAD_TIMEOUT", "-1", "FLASHDINO_DOWNLOAD_TIMEOUT='-1' is out of range"),
    ("FLASHDINO_DOWNLOAD_MIN_RATE", "nan", "FLASHDINO_DOWNLOAD_MIN_RATE='nan' is not a finite number"),
    ("FLASHDINO_DOWNLOAD_RETRIES", "2.5", "FLASHDINO_DOWNLOAD_RETRIES='2.5' is not an integer"),
])
def test_bad_download_settings_name_the_variable(fast_network, monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with serve({}) as (base, requested):
        with pytest.raises(ValueError, match=match):
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.pth", **TINY)
        assert not requested


# ------------------------------------------------------------------------- non-finite weights


def test_non_finite_weights_warn_naming_the_tensors(tmp_path):
    from flashdino.loading import NonFiniteWeightsWarning

    model = flashdino.create_model("dinov3_vits16", depth=2, embed_dim=64, num_heads=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    bad = ["cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias"]
    sd[bad[0]][0, 0, 3] = float("nan")
    sd[bad[1]][5, 7] = float("inf")
    sd[bad[2]][1] = -float("inf")
    save_file(sd, tmp_path / "w.safetensors")
    with pytest.warns(NonFiniteWeightsWarning) as record:
        flashdino.create_model("dinov3_vits16", weights=tmp_path / "w.safetensors", depth=2, embed_dim=64, num_heads=2)
    assert len(record) == 1
    text = str(record[0].message)
    assert "3 weight tensor(s) hold inf or NaN" in text and all(name in text for name in bad)
    assert str(tmp_path / "w.safetensors") in text
    assert record[0].filename == __file__, "the warning points at the caller's line"
    # many bad tensors: the first names and a count, one line
    many = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    with pytest.warns(NonFiniteWeightsWarning, match=rf"{len(many)} weight tensor\(s\).* and {len(many) - 8} more"):
        flashdino.create_model("dinov3_vits16", weights=many, depth=2, embed_dim=64, num_heads=2)


def test_finite_weights_load_without_the_warning(tmp_path):
    import warnings

    from flashdino.loading import NonFiniteWeightsWarning

    model = flashdino.create_model("dinov3_vits16", **TINY)
    big = {k: v * 1e30 if v.is_floating_point() and v.numel() > 1 else v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightsWarning)
        flashdino.create_model("dinov3_vits16", weights=big, **TINY)  # large but finite: a float64 sum holds it


# ------------------------------------------------------------------------- environment variables


@pytest.mark.parametrize("name,value,match", [
    ("WORLD_SIZE", "abc", "WORLD_SIZE='abc' is not an integer"),
    ("RANK", "x1", "RANK='x1' is not an integer"),
    ("LOCAL_RANK", "-1", "LOCAL_RANK='-1' is out of range"),
    ("WORLD_SIZE", "0", "WORLD_SIZE='0' is out of range"),
])
def test_bad_torchrun_variables_are_named(monkeypatch, name, value, match):
    from flashdino.env import torchrun_env

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        torchrun_env()


def test_torchrun_rank_beyond_world_is_named(monkeypatch):
    from flashdino.env import torchrun_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 but WORLD_SIZE=2"):
        torchrun_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # without LOCAL_WORLD_SIZE (some launchers) it is not checked
    assert torchrun_env() == (1, 2, 1, 1)


def test_cli_names_a_bad_world_size(tmp_path, monkeypatch, capsys):
    from flashdino.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    code = main(["features", "--sample", "--model", "dinov3_vits16", "--override", "depth=1", "--out",
                 str(tmp_path / "shards")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("flashdino: error: WORLD_SIZE='abc' is not an integer")
    assert "Traceback" not in "\n".join(err)


def test_headers_sent_a_byte_at_a_time_fail_within_the_timeout(fast_network, monkeypatch):
    from _servers import raw_server, slow_headers

    monkeypatch.setenv("FLASHDINO_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setenv("FLASHDINO_DOWNLOAD_RETRIES", "0")
    with raw_server(slow_headers(0.2)) as (base, _):
        start = time.perf_counter()
        with pytest.raises(WeightsUnavailableError, match="did not finish its response headers within 1 s"):
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.pth", **TINY)
        assert time.perf_counter() - start < 4


def test_a_download_cut_short_with_a_length_is_retried_then_named(fast_network):
    from _servers import raw_server

    def respond(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n" + b"x" * 1000)

    with raw_server(respond) as (base, conns):
        with pytest.raises(WeightsUnavailableError, match="cannot download .* after 2 attempt"):
            flashdino.create_model("dinov3_vits16", weights=f"{base}/w.pth", **TINY)
        assert len(conns) == 2
    assert not list(fast_network.glob("*"))
