"""Students as Hub / PEFT artifacts: save_pretrained, from_pretrained (directory or hub id), push_to_hub,
the README's Python API, LoRA students in PEFT's own format. Nothing touches the network: the hub
functions are replaced by local fakes (HF_HUB_OFFLINE=1 is set by conftest)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import tiny
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from pipeline import Student, load_base_model, new_student
from pipeline.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CARD,
    PEFT_CONFIG,
    PEFT_DIR,
    PEFT_WEIGHTS,
    AdapterError,
    model_card,
    read_adapter_config,
)
from pipeline.config import UserError

README = Path(__file__).resolve().parents[1] / "README.md"
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])
STORE = {"task": "plurals", "shots": 8, "n": 100, "layer_target": "mlp", "model": "tiny"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama saved to disk: loaded by path as a user's model would be."""
    f = tiny("llama")
    d = tmp_path_factory.mktemp("tiny-llama")
    f.model.save_pretrained(d)
    f.processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_base_model(str(model_dir), device="cpu")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained(loaded, method, seed=0, **info):
    """A fresh student of ``method`` on ``loaded`` with random (acting) parameters, in inference mode."""
    student = new_student(method, "mimic", loaded.model, loaded.geometry, base_model=loaded.source.recorded,
                          base_revision=loaded.source.revision, base_fingerprint=loaded.source.fingerprint, **info)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in student.trainable():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return student.eval()


def saved(loaded, method, directory, pretrained=False, **info):
    """Save a random student of ``method`` into ``directory``; returns (its logits, its config)."""
    student = trained(loaded, method, **info)
    try:
        out = logits(loaded.model)
        with student.disabled():
            assert (out - logits(loaded.model)).abs().max() > 1e-3, "the student must act, or the test shows nothing"
        (student.save_pretrained if pretrained else student.save)(directory)
        return out, student.config
    finally:
        student.detach()


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file())


def one_line(err):
    text = str(err.value)
    assert "\n" not in text and len(text) < 600, text
    return text


# --- the README's Python API -------------------------------------------------------------------------

def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_runs(model_dir, loaded, tmp_path, capsys):
    code = readme_snippet()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    run = tmp_path / "runs" / "plurals-mimic"
    student_logits, config = saved(loaded, "mimic", run)  # what `pipeline train-student` writes
    assert '"smollm2-135m"' in code and '"runs/plurals-mimic"' in code
    code = code.replace('"smollm2-135m"', repr(str(model_dir))).replace('"runs/plurals-mimic"', repr(str(run)))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    student, model = namespace["student"], namespace["loaded"].model
    try:
        printed = capsys.readouterr().out
        assert printed.startswith("[") and "->" in printed, printed
        assert namespace["batch"]["input_ids"].shape[1] > 1
        assert student.config == config and not student.training
        assert torch.equal(logits(model), student_logits)
        generated = model.generate(**namespace["batch"], max_new_tokens=5, do_sample=False)
        assert generated.shape[1] == namespace["batch"]["input_ids"].shape[1] + 5
    finally:
        student.detach()


# --- save_pretrained / from_pretrained ---------------------------------------------------------------

def test_save_pretrained_round_trip_and_model_card(loaded, tmp_path):
    out, config = saved(loaded, "mimic", tmp_path, pretrained=True, store_fingerprint=STORE)
    assert files(tmp_path) == sorted([MODEL_CARD, ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert read_adapter_config(tmp_path) == config  # the run directory's format, unchanged
    student = Student.from_pretrained(tmp_path, loaded)
    try:
        assert torch.equal(logits(loaded.model), out)
        parameters = student.num_parameters()
    finally:
        student.detach()
    card = huggingface_hub.ModelCard.load(tmp_path / MODEL_CARD)
    assert {"mimic-pipeline", "mimic"} <= set(card.data.tags)
    assert card.data.base_model is None, "a local directory is no hub id: no base_model metadata"
    for text in ("`mimic/mimic`", f"`{loaded.source.recorded}`", f"{parameters:,}", "task `plurals`",
                 "8-shot ICL teacher", "100 queries", "Student.from_pretrained("):
        assert text in card.text, text


def test_model_card_names_the_hub_base_model():
    from pipeline.adapters import AdapterConfig

    config = AdapterConfig(method="live", num_layers=2, num_heads=4, head_dim=8, hidden_size=32,
                           base_model="idefics2-8b", base_revision="abc")
    card = huggingface_hub.ModelCard(model_card(config, 1234, "me/live-student"))
    assert card.data.base_model == "HuggingFaceM4/idefics2-8b-base"  # the alias resolved
    assert "1,234" in card.text and "no teacher store recorded" in card.text
    assert 'Student.from_pretrained("me/live-student", loaded)' in card.text


def test_from_pretrained_plain_transformers_model(model_dir, loaded, tmp_path):
    """A model from transformers itself (stock attention) is routed like ``wrap_model`` does."""
    from transformers import AutoModelForCausalLM

    out, _ = saved(loaded, "mimic", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    student = Student.from_pretrained(str(tmp_path), model)
    try:
        assert torch.equal(logits(model), out)
    finally:
        student.detach()


def test_from_pretrained_warns_on_other_weights(loaded, tmp_path):
    saved(loaded, "live", tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_fingerprint": "sha256:other"}))
    with pytest.warns(UserWarning, match="other weights"):
        student = Student.from_pretrained(tmp_path, loaded)
    student.detach()


# --- hub ids (a local fake of snapshot_download) -------------------------------------------------------

def fake_snapshot(monkeypatch, repos: dict[str, Path]):
    """Replace ``huggingface_hub.snapshot_download`` by a copy out of ``repos`` (repo id -> directory)
    honouring ``allow_patterns``; returns the list of calls."""
    calls = []

    def snapshot_download(repo_id, *, allow_patterns=None, cache_dir=None, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, **kwargs})
        if repo_id not in repos:
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found for url",
                                          response=SimpleNamespace(headers={}, request=None))
        if kwargs.get("revision") == "nope":
            raise RevisionNotFoundError("404 Client Error. Revision Not Found",
                                        response=SimpleNamespace(headers={}, request=None))
        snapshot = Path(cache_dir) / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in repos[repo_id].rglob("*"):
            name = str(path.relative_to(repos[repo_id]))
            if path.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns or ["*"]):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_from_pretrained_hub_id(loaded, tmp_path, monkeypatch):
    out, config = saved(loaded, "lora", tmp_path / "repo", pretrained=True)
    calls = fake_snapshot(monkeypatch, {"me/student": tmp_path / "repo"})
    student = Student.from_pretrained("me/student", loaded, revision="v1", cache_dir=tmp_path / "hf")
    try:
        assert student.config == config and torch.equal(logits(loaded.model), out)
    finally:
        student.detach()
    assert calls == [{"repo_id": "me/student", "revision": "v1", "token": None, "library_name": "mimic-pipeline",
                      "allow_patterns": [ADAPTER_CONFIG, ADAPTER_WEIGHTS]}]
    assert files(tmp_path / "hf" / "me--student") == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS]), "only the two"


def test_hub_errors_are_one_line(loaded, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    fake_snapshot(monkeypatch, {"me/empty": tmp_path / "empty", "me/ok": tmp_path / "empty"})
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained("me/missing", loaded, cache_dir=tmp_path / "hf")
    assert "'me/missing' was not found" in one_line(err) and "token=" in str(err.value)
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained("me/ok", loaded, revision="nope", cache_dir=tmp_path / "hf")
    assert "has no revision 'nope'" in one_line(err)
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained("me/empty", loaded, cache_dir=tmp_path / "hf")
    assert f"holds no {ADAPTER_CONFIG} and no {ADAPTER_WEIGHTS}" in one_line(err)
    assert "peft_config" not in loaded.model.__dict__


def test_hub_id_offline_is_one_line(loaded, tmp_path):
    """The real snapshot_download, offline (HF_HUB_OFFLINE=1) and not cached: nothing is downloaded."""
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained("me/not-cached", loaded, cache_dir=tmp_path / "hf")
    assert "HF_HUB_OFFLINE is set" in one_line(err) and "local student directory" in str(err.value)


def test_local_errors_are_one_line(loaded, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained(tmp_path / "empty", loaded)
    assert f"no {ADAPTER_CONFIG} in" in one_line(err)
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained(str(tmp_path / "nowhere"), loaded)
    assert "no student directory" in one_line(err) and "hub id" in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained(tmp_path / "file", loaded)
    assert "is a file" in one_line(err)
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained(tmp_path / "empty", loaded, revision="main")
    assert "applies to hub ids only" in one_line(err)


def test_student_of_other_shapes_is_refused(loaded, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    saved(loaded, "mimic", tmp_path)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    flags, attention = [p.requires_grad for p in other.parameters()], other.config._attn_implementation
    with pytest.raises(AdapterError) as err:
        Student.from_pretrained(tmp_path, other)
    assert re.search(r"made for .* \(layers=2, heads=4, head_dim=8, hidden=32\) but the model .* has layers=3, "
                     r"heads=4, head_dim=12, hidden=48", one_line(err))
    assert [p.requires_grad for p in other.parameters()] == flags
    assert other.config._attn_implementation == attention, "a refused student leaves the model as it came"


# --- LoRA in PEFT's format ---------------------------------------------------------------------------

def test_lora_student_loads_with_peft(model_dir, loaded, tmp_path):
    import peft
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    assert (PEFT_CONFIG, PEFT_WEIGHTS) == (peft.utils.constants.CONFIG_NAME,
                                           peft.utils.constants.SAFETENSORS_WEIGHTS_NAME)
    run = tmp_path / "run"
    saved(loaded, "lora", run)  # what `pipeline train-student --method lora` writes
    assert files(run) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, f"{PEFT_DIR}/{PEFT_CONFIG}", f"{PEFT_DIR}/{PEFT_WEIGHTS}"])
    ours = read_adapter_config(run)  # the top level is still this pipeline's config
    student = Student.from_pretrained(run, loaded)
    try:
        expected = logits(loaded.model)
    finally:
        student.detach()

    for where, kwargs in ((run / PEFT_DIR, {}), (run, {"subfolder": PEFT_DIR})):
        config = PeftConfig.from_pretrained(str(where), **kwargs)
        assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", ours.lora["r"], ours.lora["alpha"])
        assert set(config.target_modules) == set(ours.lora["target_modules"])
        assert config.base_model_name_or_path == loaded.source.recorded
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # stock attention, no pipeline code
        theirs = PeftModel.from_pretrained(base, str(where), **kwargs)
        assert torch.equal(logits(theirs), expected), (logits(theirs) - expected).abs().max()

    with pytest.raises(AdapterError) as err:  # PEFT's folder given to our loader: named, with the fix
        Student.from_pretrained(run / PEFT_DIR, loaded)
    assert "PEFT's adapter config" in one_line(err) and "parent of its peft/" in str(err.value)

    shutil.rmtree(run / PEFT_DIR)  # a run saved before the PEFT export existed still loads
    Student.from_pretrained(run, loaded).detach()


def test_peft_folder_follows_the_method_saved(loaded, tmp_path):
    saved(loaded, "lora", tmp_path)
    assert (tmp_path / PEFT_DIR / PEFT_WEIGHTS).is_file()
    saved(loaded, "mimic", tmp_path)  # another method into the same directory: no stale PEFT export
    assert not (tmp_path / PEFT_DIR).exists()
    saved(loaded, "lora", tmp_path)
    (tmp_path / PEFT_DIR / "notes.txt").write_text("the user's")
    saved(loaded, "live", tmp_path)  # a peft/ holding someone else's file is left alone
    assert files(tmp_path / PEFT_DIR) == sorted(["notes.txt", PEFT_CONFIG, PEFT_WEIGHTS])


# --- push_to_hub (a local fake of the hub API) -------------------------------------------------------

def test_push_to_hub_uploads_save_pretrained_files(loaded, tmp_path, monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        card = (Path(folder_path) / MODEL_CARD).read_text()
        calls.append(("upload_folder", repo_id, files(folder_path), card, kwargs))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    student = trained(loaded, "lora", store_fingerprint=STORE)
    try:
        assert student.push_to_hub("me/lora-student", private=True, commit_message="first") == "commit-info"
        student.push_to_hub("me/lora-student", revision="dev", create_pr=True)
    finally:
        student.detach()
    (_, repo, create), (_, up_repo, uploaded, card, upload) = calls[:2]
    assert (repo, create) == ("me/lora-student", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert up_repo == "me/lora-student"
    assert uploaded == sorted([MODEL_CARD, ADAPTER_CONFIG, ADAPTER_WEIGHTS, f"{PEFT_DIR}/{PEFT_CONFIG}",
                               f"{PEFT_DIR}/{PEFT_WEIGHTS}"])
    assert upload == {"repo_type": "model", "revision": None, "commit_message": "first", "create_pr": False}
    assert 'Student.from_pretrained("me/lora-student", loaded)' in card and "task `plurals`" in card
    assert 'subfolder="peft"' in card
    assert calls[2][2]["private"] is None
    assert calls[3][4] == {"repo_type": "model", "revision": "dev", "commit_message": "Upload lora r=16 student",
                           "create_pr": True}


def test_push_to_hub_offline_is_one_line(loaded):
    """The real HfApi with HF_HUB_OFFLINE=1: refused before any request, as a one-line UserError."""
    student = trained(loaded, "live")
    try:
        with pytest.raises(UserError) as err:
            student.push_to_hub("me/live-student")
    finally:
        student.detach()
    assert "cannot push the student to hub repository 'me/live-student'" in one_line(err)
