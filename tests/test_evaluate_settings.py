"""`pipeline evaluate` across settings, damaged students, and the results folder.

- Results of other settings (n queries, beams) are kept beside earlier ones, never replaced; the
  table groups rows by settings and computes speed-ups only within a group.
- Every damaged or foreign student file is refused with a one-line error before any generation,
  through ``stages.evaluate.run`` and through the CLI (exit 2, no traceback).
- A results folder that cannot be written is a one-line error; files the pipeline did not write
  are never overwritten.
- A LoRA student with dropout in its config gives the same records every time (dropout is off in
  evaluation).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_evaluate import TASK, count_generate, fresh_loaded, make_trained

from pipeline.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    AdapterError,
    save_adapter,
)
from pipeline.students import new_student
from stages import evaluate
from stages.evaluation import ResultsError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher store and a 2-step MimIC run of the tiny Llama on the antonyms task."""
    root, run_dir, _ = make_trained(tmp_path_factory.mktemp("settings"), n_queries=4)
    return root, run_dir


def config(root: Path, results: Path, **kw) -> evaluate.EvalConfig:
    base = dict(runs_dir=str(root / "runs"), task=TASK, n_queries=4, batch_size=4, l2_queries=2,
                results_dir=str(results), device="cpu")
    return evaluate.EvalConfig(**{**base, **kw})


def forbid_generate(model, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("generation started before every run was checked")

    monkeypatch.setattr(model, "generate", refuse)


def table_groups(table: str) -> dict[str, dict[str, list[str]]]:
    """{group heading: {row label: cells}} plus the group's header row under the key "|header|"."""
    groups: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in table.splitlines():
        if line.startswith("### "):
            current = groups.setdefault(line[4:], {})
        elif line.startswith("| ") and current is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            current["|header|" if cells[0] == "mode" else cells[0]] = cells
    return groups


def heading(groups: dict, n: int, beams: int) -> str:
    found = [h for h in groups if f"n={n}, num_beams={beams}," in h]
    assert len(found) == 1, (n, beams, list(groups))
    return found[0]


# --- (a) other settings are kept side by side; the table compares like with like -----------------


def test_other_settings_are_kept_and_grouped(trained, tmp_path, monkeypatch):
    root, _ = trained
    results = tmp_path / "results"
    folder = results / TASK
    loaded = fresh_loaded()
    calls = count_generate(loaded.model, monkeypatch)
    first = evaluate.run(config(root, results, modes=("zero-shot", "icl")), loaded=loaded, show_progress=False)
    assert sorted(p.name for p in folder.glob("*.json")) == ["icl-2shot.json", "zero-shot.json"]
    first_bytes = {p.name: p.read_bytes() for p in folder.glob("*.json")}

    # fewer queries: a new file beside the first; its records are the first run's (nothing generated)
    generated = sum(calls)
    second = evaluate.run(config(root, results, modes=("zero-shot",), n_queries=2), loaded=loaded,
                          show_progress=False)
    assert sum(calls) == generated
    assert {p.name: p.read_bytes() for p in folder.glob("*.json") if p.name in first_bytes} == first_bytes
    new = sorted(set(p.name for p in folder.glob("*.json")) - set(first_bytes))
    assert len(new) == 1 and new[0].startswith("zero-shot@") and "-n2-" in new[0] and "beams3" in new[0]
    assert Path(second["files"]["zero-shot"]).name == new[0]
    saved_n2 = json.loads((folder / new[0]).read_text())
    assert saved_n2["n"] == 2
    assert saved_n2["records"] == first["results"]["zero-shot"]["records"][:2]

    # more queries (same other settings): only the 2 new queries are generated, plus the 1-prompt warm-up
    generated = sum(calls)
    third = evaluate.run(config(root, results, modes=("zero-shot",), n_queries=6), loaded=loaded,
                         show_progress=False)
    assert sum(calls) - generated == 2 + 1
    assert third["results"]["zero-shot"]["records"][:4] == first["results"]["zero-shot"]["records"]

    # other beams: both modes generated again, in files of their own
    beams1 = evaluate.run(config(root, results, modes=("zero-shot", "icl"), num_beams=1), loaded=loaded,
                          show_progress=False)
    assert {p.name: p.read_bytes() for p in folder.glob("*.json") if p.name in first_bytes} == first_bytes
    assert len(list(folder.glob("*.json"))) == 2 + 1 + 1 + 2
    assert all("beams1" in Path(f).name for f in beams1["files"].values())

    table = (folder / "table.md").read_text()
    assert table.endswith(beams1["table"])
    groups = table_groups(beams1["table"])
    assert len(groups) == 4
    for n, beams, rows in ((4, 3, first["results"]), (4, 1, beams1["results"])):
        group = groups[heading(groups, n, beams)]
        assert "max_new_tokens=10" in heading(groups, n, beams) and "tiny-llama" in heading(groups, n, beams)
        assert group["|header|"][5] == "speed-up vs 2-shot ICL"
        assert set(group) == {"|header|", "zero-shot", "2-shot ICL"}
        assert group["zero-shot"][2] == str(n)
        icl_ms = rows["icl-2shot"]["mean_latency_ms"]
        assert group["zero-shot"][5] == f"{icl_ms / rows['zero-shot']['mean_latency_ms']:.2f}x"
        assert group["2-shot ICL"][5] == "1.00x"
    for n, run in ((2, second), (6, third)):  # groups without an ICL row: no speed-up at all
        group = groups[heading(groups, n, 3)]
        assert set(group) == {"|header|", "zero-shot"}
        assert group["|header|"][5] == "speed-up vs ICL" and group["zero-shot"][5] == "-"
        assert group["zero-shot"][1] == f"{run['results']['zero-shot']['score']:.2f}"

    # the same settings again: the same files, nothing generated, the same table
    generated = sum(calls)
    again = evaluate.run(config(root, results, modes=("zero-shot", "icl"), num_beams=1), loaded=loaded,
                         show_progress=False)
    assert sum(calls) == generated and again["files"] == beams1["files"] and again["table"] == beams1["table"]


def test_student_results_kept_per_settings_with_their_own_l2_plot(trained, tmp_path):
    root, run_dir = trained
    results = tmp_path / "results"
    loaded = fresh_loaded()
    a = evaluate.run(config(root, results, modes=("student",), n_queries=2), loaded=loaded, show_progress=False)
    b = evaluate.run(config(root, results, modes=("student",), n_queries=3), loaded=loaded, show_progress=False)
    fa, fb = Path(a["files"][run_dir.name]), Path(b["files"][run_dir.name])
    assert fa.name == f"{run_dir.name}.json" and fb.name.startswith(f"{run_dir.name}@") and fa.exists()
    assert json.loads(fa.read_text())["n"] == 2 and json.loads(fb.read_text())["n"] == 3
    pngs = sorted(p.name for p in (results / TASK).glob("l2_*.png"))
    assert pngs == sorted([f"l2_{fa.stem}.png", f"l2_{fb.stem}.png"])


# --- files the pipeline did not write are never replaced ------------------------------------------


def test_foreign_files_in_the_results_folder_are_left_alone(trained, tmp_path, monkeypatch):
    root, run_dir = trained
    results = tmp_path / "results"
    folder = results / TASK
    folder.mkdir(parents=True)
    mine = {"zero-shot.json": '{"note": "my own zero-shot numbers"}', "zero-shot.partial.jsonl": "hello\n",
            "notes.json": "{not json", "table.md": "# my notes\n"}
    for name, text in mine.items():
        (folder / name).write_text(text)
    loaded = fresh_loaded()
    forbid_generate(loaded.model, monkeypatch)
    with pytest.raises(ResultsError, match=re.escape(f"{folder / 'table.md'} was not written by `pipeline evaluate`")):
        evaluate.run(config(root, results, modes=("zero-shot",)), loaded=loaded, show_progress=False)

    (folder / "table.md").unlink()
    del mine["table.md"]
    png = folder / f"l2_{run_dir.name}.png"
    Image.new("RGB", (4, 4)).save(png)
    mine_png = png.read_bytes()
    with pytest.raises(ResultsError, match=re.escape(f"{png} was not written by `pipeline evaluate`")):
        evaluate.run(config(root, results, modes=("student",)), loaded=loaded, show_progress=False)
    # the folder's lock file is the pipeline's own (pipeline.locks)
    assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == sorted([*mine, png.name])

    monkeypatch.undo()
    out = evaluate.run(config(root, results, modes=("zero-shot",)), loaded=loaded, show_progress=False)
    assert {name: (folder / name).read_text() for name in mine} == mine
    assert png.read_bytes() == mine_png
    written = Path(out["files"]["zero-shot"])
    assert written.name.startswith("zero-shot@") and json.loads(written.read_text())["n"] == 4
    # the table is ours now: a second run may rewrite it
    again = evaluate.run(config(root, results, modes=("zero-shot",)), loaded=loaded, show_progress=False)
    assert again["files"] == out["files"] and (folder / "table.md").read_text().endswith(again["table"])
    # someone's file beside our result, at the name of its partial records: both names are now taken
    foreign_partial = written.with_name(written.stem + ".partial.jsonl")
    foreign_partial.write_text("mine\n")
    with pytest.raises(ResultsError, match=r"zero-shot\.json and zero-shot@.*\.json are both taken"):
        evaluate.run(config(root, results, modes=("zero-shot",)), loaded=loaded, show_progress=False)
    assert foreign_partial.read_text() == "mine\n"


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_results_dir_that_is_not_a_directory(trained, tmp_path, where):
    root, _ = trained
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should be")
    results = blocker if where == "file" else blocker / "deeper"
    with pytest.raises(ResultsError, match=rf"--results-dir {re.escape(str(results))}: cannot write results to "
                                           r".*expected a writable directory") as err:
        evaluate.run(config(root, results, modes=("zero-shot",)), loaded=fresh_loaded(), show_progress=False)
    assert "\n" not in str(err.value)
    assert blocker.read_text() == "a file where the results folder should be"


def test_unwritable_results_dir_is_one_line(trained, tmp_path, monkeypatch):
    """The probe file cannot be created (as in a read-only directory; root ignores chmod, so the OS
    refusal is simulated here and real in the next test)."""
    root, _ = trained

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ResultsError, match=r"--results-dir .*: cannot write results to .*antonyms \(Permission "
                                           r"denied\); expected a writable directory") as err:
        evaluate.run(config(root, tmp_path / "results", modes=("zero-shot",)), loaded=fresh_loaded(),
                     show_progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_results_dir(trained, tmp_path):
    root, _ = trained
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o500)
    try:
        with pytest.raises(ResultsError, match=r"cannot write results to .*Permission denied"):
            evaluate.run(config(root, results, modes=("zero-shot",)), loaded=fresh_loaded(), show_progress=False)
    finally:
        results.chmod(0o700)


# --- (b) damaged students are refused before any generation ---------------------------------------


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def rewrite(path: Path, change) -> None:
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}  # copied out of the file's memory map
    change(tensors)
    save_file(tensors, str(path))


def nan_adapter(run: Path) -> str:
    rewrite(run / ADAPTER_WEIGHTS, lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items()}))
    return r"tensor '0\.f_bias' has 4 non-finite values \(NaN or inf\) of 4"


def int_adapter(run: Path) -> str:
    rewrite(run / ADAPTER_WEIGHTS, lambda t: t.update({"1.shift": torch.zeros(4, 8, dtype=torch.int64)}))
    return r"tensor '1\.shift' has dtype int64, expected a floating-point dtype"


def truncated_adapter(run: Path) -> str:
    data = (run / ADAPTER_WEIGHTS).read_bytes()
    (run / ADAPTER_WEIGHTS).write_bytes(data[: len(data) - 10])
    return r"is not a readable safetensors file .*truncated or damaged"


def pickle_adapter(run: Path) -> str:
    tensors = {k: v.clone() for k, v in load_file(str(run / ADAPTER_WEIGHTS)).items()}
    (run / ADAPTER_WEIGHTS).write_bytes(pickle.dumps(tensors))
    return r"is a Python pickle, not a safetensors file; it was not loaded"


def renamed_tensor(run: Path) -> str:
    rewrite(run / ADAPTER_WEIGHTS, lambda t: t.update({"0.gate": t.pop("0.f_bias")}))
    return r"missing \['0\.f_bias'\], unexpected \['0\.gate'\]"


def shape_mismatch(run: Path) -> str:
    cfg = json.loads((run / ADAPTER_CONFIG).read_text())
    (run / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "variant": "head_shared"}))
    return r"tensor '0\.f_weight' has shape \[4, 8\], but adapter_config\.json \(mimic/head_shared"


def bad_config(run: Path) -> str:
    cfg = json.loads((run / ADAPTER_CONFIG).read_text())
    (run / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "num_layers": "x"}))
    return r"adapter_config\.json: 'num_layers' is 'x', expected a positive integer"


FAULTS = [nan_adapter, int_adapter, truncated_adapter, pickle_adapter, renamed_tensor, shape_mismatch, bad_config]


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_adapter_refused_before_generation(trained, tmp_path, monkeypatch, fault):
    root, run_dir = trained
    run = copy_run(run_dir, tmp_path / "damaged")
    pattern = fault(run)
    loaded = fresh_loaded()
    forbid_generate(loaded.model, monkeypatch)
    with pytest.raises(AdapterError, match=pattern) as err:
        evaluate.run(config(root, tmp_path / "results", runs=(str(run),)), loaded=loaded, show_progress=False)
    assert str(run) in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "results").rglob("*.json"))


def test_lora_of_other_projection_sizes_refused_before_generation(trained, tmp_path, monkeypatch):
    """The LoRA matrices' sizes are only known from the model: checked against it, before generating."""
    root, _ = trained
    loaded = fresh_loaded()
    student = new_student("lora", "mimic", loaded.model, loaded.geometry, base_model="tiny-llama")
    tensors = {k: v.clone() for k, v in student.tensors().items()}
    student.detach()
    key = "model.layers.1.self_attn.v_proj.lora_B.weight"
    assert tuple(tensors[key].shape) == (16, 16)  # 2 kv heads x 8
    tensors[key] = torch.zeros(32, 16)
    save_adapter(tmp_path / "lora", student.config, tensors)
    forbid_generate(loaded.model, monkeypatch)
    with pytest.raises(AdapterError, match=re.escape(f"'{key}' has shape [32, 16]") + r".* expects \[16, 16\]"):
        evaluate.run(config(root, tmp_path / "results", runs=(str(tmp_path / "lora"),), l2=False),
                     loaded=loaded, show_progress=False)


# --- (c) a LoRA student evaluates deterministically ------------------------------------------------


def test_lora_with_dropout_gives_the_same_records_twice(trained, tmp_path):
    """Dropout in a LoRA config must be off in evaluation: two evaluations, identical generations.

    The LoRA matrices are large and random and the dropout 0.5, so dropout left on changes the
    generated tokens (this test then fails)."""
    root, _ = trained
    loaded = fresh_loaded()
    student = new_student("lora", "mimic", loaded.model, loaded.geometry, base_model="tiny-llama",
                          base_fingerprint=loaded.source.fingerprint)
    g = torch.Generator().manual_seed(11)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in student.tensors().items()}
    student.save(tmp_path / "lora-run", lora={**student.config.lora, "dropout": 0.5})
    student.detach()
    save_adapter(tmp_path / "lora-run", AdapterConfig(**json.loads((tmp_path / "lora-run" / ADAPTER_CONFIG).read_text())),
                 tensors)
    assert json.loads((tmp_path / "lora-run" / ADAPTER_CONFIG).read_text())["lora"]["dropout"] == 0.5
    outs = []
    for i in range(2):
        out = evaluate.run(config(root, tmp_path / f"results{i}", runs=(str(tmp_path / "lora-run"),), modes=("student",),
                                  n_queries=6, l2=False), loaded=loaded, show_progress=False)
        outs.append([(r["id"], r["generation"]) for r in out["results"]["lora-run"]["records"]])
    assert outs[0] == outs[1]

