"""`pipeline inspect STORE|RUN`: every figure of the report against a value computed here independently
(os.walk, numpy on the stored bf16 bits read through zarr), --verify naming damage through the CLI, bounded
memory, a tiny run trained in-process (its store rebuilt or modified afterwards), and the hostile targets."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import tiny
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline import inspection as insp
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.runtime import wrap_model
from pipeline.settings import EvalConfig, InspectConfig
from pipeline.store import SampleRecord, StoreLayout, create_store

N, T_MAX, L, D, SHOTS, S = 10, 6, 3, 16, 2, 4
LAYOUT = StoreLayout(N, T_MAX, L, D, SHOTS, shard_size=S)
ATTRS = {"model": "tiny/llama", "model_revision": "main", "task": "antonyms", "shots": SHOTS,
         "demo_strategy": "random", "demo_seed": 3407, "layer_target": "mlp", "layers": L, "hidden": D,
         "code_version": "0.1.0", "split": "train", "support_split": "support",
         "query_example_ids": [str(i) for i in range(N)] * 3}
HS_SHARD = "hs/c/1/0/0/0"


def length(i: int, t_max: int = T_MAX) -> int:
    return 1 + (i * 5) % t_max


def record(i: int, layout: StoreLayout) -> SampleRecord:
    g = torch.Generator().manual_seed(i)
    t = length(i, layout.t_max)
    hs = (3 * torch.randn(t, layout.n_layers, layout.hidden, generator=g)).bfloat16()
    return SampleRecord(hs, torch.randint(0, 500, (t,), generator=g).tolist(), [0, 1][: 1 + i % 2], 100 + i)


def build(path: Path, layout: StoreLayout = LAYOUT, shards: list[int] | None = None) -> Path:
    store = create_store(path, layout, ATTRS)
    for s in range(store.n_shards) if shards is None else shards:
        store.write_shard(s, [record(i, layout) for i in store.shard_samples(s)])
    return path


def inspect_cli(*args: str | Path) -> object:
    """`pipeline inspect ARGS` in-process; result.stdout / result.stderr / result.exit_code."""
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def flat(text: str) -> str:
    """The text with runs of spaces (the alignment) collapsed."""
    return " ".join(text.split())


def one_line_error(res, *parts: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in res.stderr
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("inspect") / "antonyms.zarr")


@pytest.fixture
def copy_of(tmp_path, store):
    """A fresh copy of the module's store, to damage."""
    def make() -> Path:
        return Path(shutil.copytree(store, tmp_path / "copy.zarr"))
    return make


@pytest.fixture(scope="module")
def report(store) -> dict:
    """The --json report of the module's store, with --verify, through the CLI."""
    res = inspect_cli(store, "--json", "--verify")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# --- a store: its figures against independent computations --------------------------------------------

def test_producer_and_completeness(report, store):
    prod = report["producer"]
    assert {k: prod[k] for k in ("model", "model_revision", "task", "shots", "demo_strategy", "layer_target",
                                 "code_version")} == {k: ATTRS[k] for k in ("model", "model_revision", "task",
                                                                          "shots", "demo_strategy", "layer_target",
                                                                          "code_version")}
    assert prod["schema_version"] == 1 and prod["query_example_ids"] == f"<{3 * N} items>"
    assert report["completeness"] == {"done": N, "planned": N, "complete": True, "shards": 3, "shards_done": 3,
                                      "shards_missing": []}
    assert report["layout"]["t_max"] == T_MAX and report["layout"]["shard_size"] == S


def test_sizes_on_disk_and_compression(report, store):
    size = report["size"]
    files = [Path(root, f) for root, _, names in os.walk(store) for f in names]
    assert size["on_disk_bytes"] == sum(f.stat().st_size for f in files) and size["files"] == len(files)
    names = ("hs", "done", "lengths", "token_ids", "icd_ids", "query_ids")
    assert set(size["arrays"]) == set(names)
    for name in names:
        chunks = [Path(root, f) for root, _, fs in os.walk(store / name / "c") for f in fs]
        nbytes = zarr.open_array(store / name, mode="r").nbytes
        got = size["arrays"][name]
        assert (got["stored_bytes"], got["uncompressed_bytes"], got["files"]) == (
            sum(f.stat().st_size for f in chunks), nbytes, len(chunks))
    stored = sum(f.stat().st_size for f in files if f.name != "zarr.json")
    raw = sum(zarr.open_array(store / n, mode="r").nbytes for n in names)
    assert size["stored_bytes"] == stored and size["uncompressed_bytes"] == raw
    assert size["compression_ratio"] == pytest.approx(raw / stored)


def test_token_length_histogram(report):
    lengths = np.array([length(i) for i in range(N)])
    h = report["token_lengths"]
    assert h["edges"] == list(range(1, T_MAX + 2))  # one bin per length up to 12 lengths
    assert h["counts"] == np.bincount(lengths, minlength=T_MAX + 1)[1:].tolist()
    assert (h["min"], h["max"], h["mean"]) == (lengths.min(), lengths.max(), pytest.approx(lengths.mean()))
    assert h["padding_fraction"] == pytest.approx(1 - lengths.sum() / (N * T_MAX))


def stored_norms(path: Path) -> np.ndarray:
    """Mean ||h_l|| over valid tokens, from the bf16 bits as stored (zarr directly, numpy only)."""
    bits = zarr.open_array(path / "hs", mode="r")[:]
    lengths = zarr.open_array(path / "lengths", mode="r")[:]
    x = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    valid = np.concatenate([x[i, :t] for i, t in enumerate(lengths)])  # (tokens, L, D)
    return np.linalg.norm(valid, axis=-1).mean(axis=0)


def test_layer_norms_and_png(report, store):
    norms = report["layer_norms"]
    np.testing.assert_allclose(norms["values"], stored_norms(store), rtol=1e-10)
    png = Path(norms["png"])
    assert png == store.parent / "antonyms.layer_norms.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.suffix == ".png" for p in store.rglob("*"))  # never inside the store


def test_verify_section_and_text_report(report, store):
    v = report["verify"]
    assert v["status"] == "intact" and v["complete"] and v["samples"] == N and v["hs_shards"] == 3
    assert v["bytes_read"] == report["size"]["stored_bytes"]  # every chunk of every array
    res = inspect_cli(store, "--verify", "--png", store.parent / "other.png")
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert text.rstrip().splitlines()[-1].startswith("verify  intact: 10 samples")
    for part in ("model tiny/llama (revision main)", "samples 10 of 10 done (complete)",
                 "query_example_ids <30 items>", "per-layer mean norm", "compression"):
        assert part in flat(text), part
    values = [float(line.split()[1]) for line in text.splitlines() if line.strip()[:1].isdigit()
              and len(line.split()) == 2 and "." in line.split()[1]]
    np.testing.assert_allclose(values, report["layer_norms"]["values"], rtol=1e-3)
    assert (store.parent / "other.png").is_file()


# --- --verify: damage named through the CLI -----------------------------------------------------------

def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the compressed samples, before the index at the end
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,parts", [
    (flip_byte, ["checksum"]),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), ["truncated"]),
    (Path.unlink, ["missing"]),
])
def test_verify_names_damage(copy_of, damage, parts):
    path = copy_of()
    damage(path / HS_SHARD)
    res = inspect_cli(path, "--verify", "--no-norms")
    one_line_error(res, str(path), f"hs shard {HS_SHARD}", "sample", *parts)
    assert "verify  DAMAGED" in res.stdout  # the report is printed, its verify section says so
    data = json.loads(inspect_cli(path, "--verify", "--json", "--no-norms").stdout)
    assert data["verify"]["status"] == "damaged" and HS_SHARD in data["verify"]["error"]


def test_damage_met_by_the_norms_is_a_one_line_error(copy_of):
    path = copy_of()
    flip_byte(path / HS_SHARD)
    one_line_error(inspect_cli(path), "checksum", "--verify")


def test_incomplete_store_is_reported_and_verified(tmp_path):
    path = build(tmp_path / "partial.zarr", shards=[1])
    data = json.loads(inspect_cli(path, "--json", "--verify").stdout)
    assert data["completeness"] | {} == {"done": 4, "planned": N, "complete": False, "shards": 3, "shards_done": 1,
                                         "shards_missing": [0, 2]}
    assert data["verify"]["status"] == "intact" and not data["verify"]["complete"] and data["verify"]["samples"] == 4
    assert data["token_lengths"]["counts"] == np.bincount([length(i) for i in range(4, 8)],
                                                          minlength=T_MAX + 1)[1:].tolist()
    assert "incomplete" in data["layer_norms"]["skipped"]
    text = inspect_cli(path, "--verify").stdout
    assert "4 of 10 done (INCOMPLETE; shards not done: 0, 2)" in flat(text)
    assert "intact (the store is incomplete: its 4 done samples of 10 checked)" in flat(text)


def test_norms_hold_a_few_samples_never_the_hs_array(tmp_path):
    n, t_max = 96, 40
    layout = StoreLayout(n, t_max, 4, 512, SHOTS, shard_size=8)
    path = build(tmp_path / "big.zarr", layout)
    sample = t_max * 4 * 512 * 8  # 640 KiB: one sample as the float64 the norms compute in
    hs_bytes = n * t_max * 4 * 512 * 2  # 15 MiB: the hs array as stored (uint16), 60 MiB as float64
    config = load_config(InspectConfig, target=str(path), json=True, workers=2)
    with contextlib.redirect_stdout(io.StringIO()):
        insp.run(config)  # imports (dask, matplotlib) out of the measurement
    tracemalloc.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            got = insp.run(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # two threads, each holding a sample and its square (and dask's partial sums): far below the array
    assert peak < min(10 * sample, hs_bytes / 2), f"peak {peak / 2**20:.1f} MiB: more than a few samples in memory"
    lengths = [length(i, t_max) for i in range(n)]
    assert got["token_lengths"]["counts"] == np.histogram(lengths, bins=got["token_lengths"]["edges"])[0].tolist()
    assert len(got["token_lengths"]["edges"]) == 13 and sum(got["token_lengths"]["counts"]) == n
    np.testing.assert_allclose(got["layer_norms"]["values"], stored_norms(path), rtol=1e-10)


# --- hostile targets ---------------------------------------------------------------------------------

def test_hostile_targets(tmp_path):
    expected = "expected a teacher store"
    one_line_error(inspect_cli(tmp_path / "nope"), "does not exist", expected)
    (tmp_path / "plain.txt").write_text("hello")
    one_line_error(inspect_cli(tmp_path / "plain.txt"), "is a file", expected)
    (tmp_path / "empty").mkdir()
    one_line_error(inspect_cli(tmp_path / "empty"), "empty directory", expected)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    one_line_error(inspect_cli(tmp_path / "other"), "neither kind", expected)
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    one_line_error(inspect_cli(tmp_path / "group.zarr"), "not a teacher store")
    one_line_error(inspect_cli(tmp_path / "empty", "--workers", "0"), "'workers'")


def test_png_inside_the_store_is_refused(store):
    one_line_error(inspect_cli(store, "--png", store / "norms.png"), "inside the store")


def test_help_explains_the_options():
    out = CliRunner().invoke(app, ["inspect", "--help"], env={"COLUMNS": "200"}).stdout
    for part in ("STORE|RUN", "--verify", "--json", "--results-dir", "--png", "--no-norms", "checksum"):
        assert part in out, part


# --- a run ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    tf = tiny("llama")
    return wrap_model(copy.deepcopy(tf.model), tf.processor, "tiny-llama")


def cache(out: Path, loaded, **kw) -> Path:
    from stages import teacher_cache

    return Path(teacher_cache.run(teacher_cache.TeacherCacheConfig(
        task="antonyms", model="tiny-llama", out=str(out), shots=2, n_queries=4, shard_size=4, device="cpu", **kw,
    ), loaded=loaded, show_progress=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama):
    """A 2-step MimIC run on a store of the tiny Llama, evaluated once (student mode): (root, run, store)."""
    from stages import evaluate, train_student

    root = tmp_path_factory.mktemp("run")
    store = cache(root / "antonyms.zarr", llama)
    run = Path(train_student.run(train_student.TrainConfig(
        cache=str(store), max_steps=2, runs_dir=str(root / "runs"), device="cpu", name="tiny-mimic", batch_size=2,
        grad_accum=1), loaded=llama, show_progress=False))
    evaluate.run(EvalConfig(runs=(str(run),), modes=("student",), n_queries=2, batch_size=2, num_beams=1, l2=False,
                            results_dir=str(root / "results"), device="cpu"), loaded=llama, show_progress=False)
    return root, run, store


def run_report(run: Path, results: Path) -> dict:
    res = inspect_cli(run, "--json", "--results-dir", results)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_run_report(trained):
    root, run, store = trained
    r = run_report(run, root / "results")
    assert (r["kind"], r["name"], r["method"]["method"]) == ("run", "tiny-mimic", "mimic")
    tensors = load_file(str(run / "adapter.safetensors"))
    assert r["parameters"]["count"] == sum(t.numel() for t in tensors.values())
    assert r["store"]["path"] == str(store) and r["store"]["status"] == "matches"
    summary = json.loads((run / "summary.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    t = r["training"]
    assert (t["steps"], t["checkpoint_step"], t["final_loss"]) == (2, 2, summary["final_loss"])
    assert t["last"]["loss"] == log[-1]["loss"] and t["first"]["loss"] == log[0]["loss"]
    assert r["loss_curve"] == str(run / "loss_curve.png") and Path(r["loss_curve"]).is_file()
    saved = json.loads((root / "results" / "antonyms" / "tiny-mimic.json").read_text())
    assert [(e["file"], e["score"], e["n"], e["adapter_matches"]) for e in r["evaluations"]] == [
        (str(root / "results" / "antonyms" / "tiny-mimic.json"), saved["score"], 2, True)]
    text = inspect_cli(run, "--results-dir", root / "results").stdout
    for part in ("method mimic", f"store {store}: matches", "steps 2, checkpoint at step 2",
                 "evaluations in", "tiny-mimic.json"):
        assert part in flat(text), part
    assert run_report(run, root / "nowhere")["evaluations"] == []
    one_line_error(inspect_cli(run, "--verify"), "apply to a teacher store")


def moved_run(trained, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose config.yaml points at a copy of its store (to rebuild or modify)."""
    _, run, store = trained
    new_store = Path(shutil.copytree(store, tmp_path / "antonyms.zarr"))
    new_run = Path(shutil.copytree(run, tmp_path / "runs" / run.name))
    config = yaml.safe_load((new_run / "config.yaml").read_text())
    (new_run / "config.yaml").write_text(yaml.safe_dump({**config, "cache": str(new_store)}, sort_keys=False))
    return new_run, new_store


def test_run_detects_a_rebuilt_store(trained, tmp_path, llama):
    run, store = moved_run(trained, tmp_path)
    assert run_report(run, tmp_path)["store"]["status"] == "matches"
    created = json.loads((store / "zarr.json").read_text())["attributes"]["created"]
    while datetime.now(timezone.utc).isoformat(timespec="seconds") == created:  # `created` has 1 s resolution
        time.sleep(0.05)
    shutil.rmtree(store)  # teacher-cache resumes a store of the same settings: a rebuild starts from nothing
    cache(store, llama)
    s = run_report(run, tmp_path)["store"]
    assert s["status"] == "rebuilt" and s["differences"] == [] and s["identity"]["created"] != created
    assert "REBUILT (same settings, but rebuilt since the run" in flat(inspect_cli(run).stdout)


def test_run_detects_a_modified_or_missing_store(trained, tmp_path):
    run, store = moved_run(trained, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["demo_seed"] = 7
    (store / "zarr.json").write_text(json.dumps(meta))
    s = run_report(run, tmp_path)["store"]
    assert s["status"] == "changed" and s["differences"] == ["demo_seed: trained on 3407 vs now 7"]
    assert "CHANGED (demo_seed: trained on 3407 vs now 7)" in flat(inspect_cli(run).stdout)
    shutil.rmtree(store)
    assert run_report(run, tmp_path)["store"]["status"] == "missing"


def test_unfinished_run_without_adapter(trained, tmp_path):
    """A run killed before its first save: config.yaml and the log only; reported, not refused."""
    _, run, _ = trained
    partial = tmp_path / "runs" / "killed"
    partial.mkdir(parents=True)
    shutil.copy(run / "config.yaml", partial)
    shutil.copy(run / "train_log.jsonl", partial)
    r = run_report(partial, tmp_path)
    assert r["method"]["method"] == "mimic" and r["parameters"] is None and r["evaluations"] == []
    assert not r["training"]["finished"] and r["training"]["steps"] == 2
    assert "no summary.json" in inspect_cli(partial).stdout
