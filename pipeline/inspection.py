"""`pipeline inspect STORE|RUN`: see, and verify, what stage 1 or stage 2 produced (docs/architecture.md §2).

A teacher store: what produced it (its attrs), completeness (samples done / planned, shards not done), size
on disk and compression, the token-length histogram, the per-layer mean norm of the cached states
(``pipeline.store.per_layer_mean_norm``: dask, one sample per task) as a table and a PNG, and with
``--verify`` the full integrity pass (``TeacherStore.verify``: every chunk read and checksummed in parallel).
A run directory: method, parameter count, the store it trained on and whether that store still matches
(the identity the checkpoint records, the settings the adapter records), steps, losses, the loss curve, and
the evaluations of the run found under ``results/<task>/``.

Read-only: nothing is written into a store or a run (the PNG goes beside the store, which `--overwrite`
would otherwise refuse as a foreign file). Storage is reached through TeacherStore, so pipeline/store.py
stays the only zarr module. Damage ends as a one-line StoreError (exit 2) after the report is printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from pipeline.config import UserError, changed_keys
from pipeline.results import is_result, read_json
from pipeline.rundir import (
    CHECKPOINT_COMPLETE,
    CHECKPOINT_CONFIG,
    CHECKPOINT_DIR,
    CHECKPOINT_WEIGHTS,
    CONFIG_FILE,
    SUMMARY_FILE,
    RunDir,
)
from pipeline.settings import InspectConfig
from pipeline.store import (
    _DECODE_ERRORS,
    DONE,
    LENGTHS,
    REQUIRED_ARRAYS,
    TOPK_INDICES,
    TOPK_VALUES,
    StoreError,
    StorePath,
    TeacherStore,
    _array_specs,
    open_store,
    per_layer_mean_norm,
    store_identity,
    store_location,
    store_settings,
)

STORE, RUN = "store", "run"
RUN_MARKERS = (CONFIG_FILE, ADAPTER_CONFIG, CHECKPOINT_DIR)
EXPECTED = ("expected a teacher store (a directory holding zarr.json, written by `pipeline teacher-cache`, "
            "e.g. cache/<task>.zarr) or a run directory (holding config.yaml, adapter_config.json or checkpoint/, "
            "written by `pipeline train-student`, e.g. runs/<name>)")
HISTOGRAM_BINS = 12
LONG_LIST = 20  # attrs lists longer than this are shown by their length (query_example_ids: one id per query)
PNG_SUFFIX = ".layer_norms.png"


# --- what is it -------------------------------------------------------------------------------------

def detect(path: StorePath) -> str:
    """STORE or RUN; a missing path, a plain file or a directory of neither kind is a one-line UserError.
    At an fsspec URL (pipeline.store.StoreURL) only a store: runs are local directories."""
    if not path.exists():
        raise UserError(f"{path} does not exist; {EXPECTED}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a directory; {EXPECTED}")
    if (path / "zarr.json").is_file():
        return STORE
    if not isinstance(path, Path):
        raise UserError(f"{path} holds no zarr.json, so it is not a teacher store; at a URL only teacher stores "
                        "are inspected (run directories are local)")
    if any((path / marker).exists() for marker in RUN_MARKERS):
        return RUN
    what = "an empty directory" if not any(path.iterdir()) else "a directory of neither kind"
    raise UserError(f"{path} is {what}; {EXPECTED}")


def open_teacher_store(path: StorePath) -> TeacherStore:
    """The store at ``path`` (read-only); a zarr group that is not a teacher store is named as such."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as err:
        raise StoreError(f"{path}/zarr.json cannot be read as JSON ({type(err).__name__}); {EXPECTED}") from err
    if not isinstance(attrs, dict) or "schema_version" not in attrs:
        raise StoreError(f"{path} is a zarr group but not a teacher store (no schema_version attribute); {EXPECTED}")
    return open_store(path)


# --- a teacher store ------------------------------------------------------------------------------------

def producer(attrs: dict) -> dict:
    """The store's attrs as recorded (model, revision, task, shots, demonstrations, layer target, versions,
    ...), long lists replaced by their length so that the report stays readable."""
    return {k: (f"<{len(v)} items>" if isinstance(v, list) and len(v) > LONG_LIST else v) for k, v in attrs.items()}


def completeness(store: TeacherStore, done: np.ndarray) -> dict:
    """Samples done of planned; shards whose done flags are not all set (to be written by a resume)."""
    shards = [store.shard_samples(s) for s in range(store.n_shards)]
    missing = [s for s, rows in enumerate(shards) if not done[rows.start:rows.stop].all()]
    n = store.layout.n_samples
    return {"done": int(done.sum()), "planned": n, "complete": bool(done.all()), "shards": store.n_shards,
            "shards_done": store.n_shards - len(missing), "shards_missing": missing}


def _row_bytes(store: TeacherStore) -> dict[str, int]:
    """Uncompressed bytes of one row (sample) of each array the store has."""
    return {name: math.prod(shape[1:]) * np.dtype(dtype).itemsize
            for name, (shape, dtype, *_) in _array_specs(store.layout).items()}


def array_names(store: TeacherStore) -> list[str]:
    """The arrays of the store: the required ones, and the top-k logits when stored."""
    return [*REQUIRED_ARRAYS, *((TOPK_VALUES, TOPK_INDICES) if store.layout.topk is not None else ())]


def sizes(store: TeacherStore) -> dict:
    """Bytes on disk (every object of the store, metadata included) and, per array, the stored bytes of its
    chunk / shard files against the uncompressed bytes of the rows those files hold (the array's nbytes once
    every file is written): the compression ratio."""
    stored = store._stored_sizes()
    rows = _row_bytes(store)
    arrays = {}
    for name in array_names(store):
        present = [(key, samples) for key, samples in store._files(name) if key in stored]
        packed = sum(stored[key] for key, _ in present)
        raw = sum(len(samples) for _, samples in present) * rows[name]
        arrays[name] = {"files": len(present), "stored_bytes": packed, "uncompressed_bytes": raw,
                        "ratio": raw / packed if packed else None}
    packed = sum(a["stored_bytes"] for a in arrays.values())
    raw = sum(a["uncompressed_bytes"] for a in arrays.values())
    return {"on_disk_bytes": sum(stored.values()), "files": len(stored), "stored_bytes": packed,
            "uncompressed_bytes": raw, "compression_ratio": raw / packed if packed else None, "arrays": arrays}


def histogram_edges(lo: int, hi: int, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Integer bin edges over lengths lo..hi: one bin per length up to `bins` lengths, else `bins` bins of
    (nearly) equal width; bin i holds lengths edges[i] .. edges[i+1] - 1."""
    span = hi - lo + 1
    return np.unique(np.linspace(lo, hi + 1, min(span, bins) + 1).round().astype(np.int64))


def token_lengths(store: TeacherStore, done: np.ndarray) -> dict:
    """Aligned tokens per done sample: min / mean / max, the share of hs that is padding, a histogram over
    the lengths seen (1..T_max when no sample is done)."""
    t_max = store.layout.t_max
    lengths = store.read_array(LENGTHS)[done].astype(np.int64)
    edges = histogram_edges(int(lengths.min()), int(lengths.max())) if len(lengths) else histogram_edges(1, t_max)
    counts, _ = np.histogram(lengths, bins=edges)
    stats = ({"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max()),
              "padding_fraction": 1 - float(lengths.sum()) / (len(lengths) * t_max)}
             if len(lengths) else {"min": None, "mean": None, "max": None, "padding_fraction": None})
    return {"t_max": t_max, "samples": len(lengths), **stats, "edges": edges.tolist(), "counts": counts.tolist()}


def default_png(path: StorePath) -> Path:
    """``cache/vqav2.zarr`` -> ``cache/vqav2.layer_norms.png``: beside the store, never inside it; for a
    store at a URL (s3://b/vqav2.zarr) ``vqav2.layer_norms.png`` in the working directory."""
    if not isinstance(path, Path):
        return Path(f"{path.name.removesuffix('.zarr')}{PNG_SUFFIX}")
    where = path if path.name not in ("", ".", "..") else path.resolve()
    return where.parent / f"{where.name.removesuffix('.zarr')}{PNG_SUFFIX}"


def _check_png(store_path: StorePath, png: Path) -> None:
    if isinstance(store_path, Path) and png.resolve().is_relative_to(store_path.resolve()):
        raise UserError(f"--png {png} is inside the store {store_path}; write it elsewhere (teacher-cache "
                        "--overwrite refuses a store holding files it did not write)")


def plot_layer_norms(values: np.ndarray, png: Path, title: str) -> Path:
    """Mean ||h_l|| per layer (matplotlib Agg, the style of pipeline/plots.py)."""
    from pipeline.plots import plt  # sets the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(values)), values, marker="o", markersize=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean L2 norm of the cached state")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def layer_norms(store: TeacherStore, done_count: int, png: Path, explicit_png: bool, workers: int | None) -> dict:
    """Per-layer mean norm over every valid token (``per_layer_mean_norm``: dask, one sample per task, so
    memory holds a few samples, never the hs array), with its PNG. Skipped on an incomplete store (that
    function validates the store, which refuses one). A chunk that fails to decode is a StoreError."""
    n = store.layout.n_samples
    if done_count < n:
        return {"values": None, "skipped": f"the store is incomplete ({done_count} of {n} samples done); "
                                           "norms are computed once every sample is written"}
    import dask

    threads = workers or min(8, os.cpu_count() or 1)
    try:
        with dask.config.set(scheduler="threads", num_workers=threads):
            values = per_layer_mean_norm(store.path)  # validates first: a lost or truncated shard is named
    except StoreError:
        raise
    except _DECODE_ERRORS as err:  # a flipped byte, met while reading (zarr's crc32c or blosc error)
        raise StoreError(f"{store.path}: an hs chunk failed its checksum or decode while computing the norms "
                         f"({err}); run `pipeline inspect {store.path} --verify` to name the damaged shards and "
                         "samples") from err
    out = {"values": [float(v) for v in values], "png": None}
    attrs = store.attrs
    title = f"{attrs.get('task', store.path.name)}: {attrs.get('layer_target', '?')} states, {n} samples"
    try:
        out["png"] = str(plot_layer_norms(values, png, title))
    except OSError as err:
        if explicit_png:
            raise UserError(f"--png {png}: cannot write it ({err.strerror or err}); choose a writable path") from err
        out["png_error"] = f"not written: {err.strerror or err} ({png}); pass --png PATH"
    return out


def verify(store: TeacherStore, workers: int | None) -> dict:
    """``TeacherStore.verify(full=True)``: every chunk of every array read and its checksum checked (dask,
    one sample at a time per thread; the progress bar goes to stderr so that --json stdout stays JSON). An
    incomplete store is checked on its done samples. Damage raises a one-line StoreError."""
    with contextlib.redirect_stdout(sys.stderr):  # dask's ProgressBar writes to sys.stdout
        rep = store.verify(full=True, progress=True, allow_incomplete=True, workers=workers)
    n = store.layout.n_samples
    return {"status": "intact", "complete": rep.samples == n, "samples": rep.samples, "planned": n,
            "files": rep.files, "hs_shards": rep.hs_shards, "bytes_read": rep.bytes_read,
            "seconds": rep.seconds, "mb_per_s": rep.mb_per_s}


def store_report(store: TeacherStore) -> dict:
    """The cheap part of a store's report: producer, layout, completeness, sizes, token lengths."""
    done = store.read_array(DONE).astype(bool)
    lay = store.layout
    return {"kind": STORE, "path": str(store.path), "producer": producer(store.attrs),
            "layout": {"n_samples": lay.n_samples, "t_max": lay.t_max, "layers": lay.n_layers, "hidden": lay.hidden,
                       "shots": lay.shots, "shard_size": lay.shard_size, "topk": lay.topk},
            "completeness": completeness(store, done), "size": sizes(store),
            "token_lengths": token_lengths(store, done)}


def inspect_store(path: StorePath, config: InspectConfig, emit: Any) -> dict:
    """The whole store report: cheap part, then --verify, then the norms. Damage met by either is emitted as
    that section's error (the report is still printed) and re-raised for the CLI's one-line exit 2."""
    store = open_teacher_store(path)
    png = Path(config.png) if config.png else default_png(path)
    _check_png(path, png)
    report = store_report(store) | {"verify": None, "layer_norms": None}
    section = None
    try:
        if config.verify:
            section = "verify"
            report["verify"] = verify(store, config.workers)
        if config.norms:
            section = "layer_norms"
            report["layer_norms"] = layer_norms(store, report["completeness"]["done"], png, bool(config.png),
                                                config.workers)
    except StoreError as err:
        if section == "verify":
            report["verify"] = {"status": "damaged", "error": str(err)}
            report["layer_norms"] = {"values": None, "skipped": "the store is damaged (see verify)"} \
                if config.norms else None
        else:
            report["layer_norms"] = {"values": None, "error": str(err)}
        emit(report)
        raise
    emit(report)
    return report


# --- a run directory ---------------------------------------------------------------------------------

def _sha16(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def count_parameters(path: Path) -> dict | None:
    """Tensors and elements in a safetensors file, from its header alone (nothing loaded); None if absent."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    except (SafetensorError, OSError) as err:
        return {"file": str(path), "error": str(err)}
    return {"file": str(path), "tensors": len(shapes), "count": sum(math.prod(s) for s in shapes),
            "bytes": path.stat().st_size}


def checkpoint_info(run: Path) -> dict:
    """The checkpoint's step (its COMPLETE mark) and the settings it records (the store's identity among
    them); empty when the run has no complete checkpoint."""
    ckpt = run / CHECKPOINT_DIR
    config = read_json(ckpt / CHECKPOINT_CONFIG)
    try:
        step = int((ckpt / CHECKPOINT_COMPLETE).read_text().strip())
    except (OSError, ValueError):
        step = None
    return {"step": step, "config": config if isinstance(config, dict) else {}}


def store_match(cache: str | None, identity: dict | None, fingerprint: dict | None) -> dict:
    """Whether the store a run trained on is still the one at the path its config.yaml records.

    status: matches | rebuilt (same settings, another `created`) | changed (settings differ, listed) |
    missing | unreadable | none (trained --online). Compares the identity the checkpoint records (every
    attr) and the settings the adapter records; the data itself is `--verify`'s job.
    """
    out: dict[str, Any] = {"path": cache, "recorded_identity": identity, "differences": []}
    if not cache:
        return {**out, "status": "none", "detail": "trained --online, without a store"}
    path = store_location(cache, check=False)
    try:
        if not path.exists():
            return {**out, "status": "missing", "detail": f"no store at {path} any more"}
        attrs = open_teacher_store(path).attrs
    except UserError as err:  # a StoreError, or a URL whose storage cannot be reached from here
        return {**out, "status": "unreadable", "detail": str(err)}
    now = store_identity(attrs)
    settings = store_settings(attrs)
    diff = changed_keys(fingerprint, settings, "trained on", "now") if fingerprint else []
    out |= {"identity": now, "differences": diff}
    if diff:
        return {**out, "status": "changed", "detail": "; ".join(diff)}
    if identity is None:
        return {**out, "status": "matches" if fingerprint else "unknown",
                "detail": "same settings (the run records no store identity: no checkpoint)" if fingerprint
                else "the run records neither the store's identity nor its settings"}
    if identity == now:
        return {**out, "status": "matches", "detail": "the same store: identity and settings"}
    if identity.get("created") != now["created"]:
        return {**out, "status": "rebuilt", "detail": f"same settings, but rebuilt since the run (created "
                                                      f"{identity.get('created')}, now {now['created']})"}
    return {**out, "status": "changed", "detail": f"attributes changed since the run (digest "
                                                  f"{identity.get('attrs_sha256')}, now {now['attrs_sha256']})"}


def training(run: RunDir, checkpoint_step: int | None) -> dict:
    """Steps, first and final losses (with their parts) and throughput, from summary.json and the log."""
    summary = read_json(run.path / SUMMARY_FILE)
    summary = summary if isinstance(summary, dict) else {}
    log = run.read_log()

    def losses(row: dict | None) -> dict | None:
        return None if row is None else {k: row.get(k) for k in ("loss", "align", "gt", "lr")}

    first, last = losses(log[0] if log else None), losses(log[-1] if log else None)
    return {"finished": bool(summary), "steps": summary.get("steps", log[-1]["step"] if log else None),
            "logged_steps": len(log), "checkpoint_step": checkpoint_step, "final_loss": summary.get("final_loss"),
            "first": first, "last": last, "align": summary.get("align"),
            "samples_per_s": summary.get("samples_per_s"), "elapsed_s": summary.get("elapsed_s"),
            "fit": summary.get("fit") if isinstance(summary.get("fit"), dict) else None}


def evaluations(run: Path, results_dir: Path, adapter_sha: str | None) -> list[dict]:
    """Results of `pipeline evaluate` naming this run (results/<task>/<name>[@settings].json, mode student);
    a result whose recorded run path is another existing directory is another run of the same name.
    adapter_matches: whether it was made with the adapter the run holds now."""
    found = []
    for path in sorted(results_dir.glob("*/*.json")) if results_dir.is_dir() else []:
        data = read_json(path)
        if not (isinstance(data, dict) and is_result(data) and data.get("mode") == "student"
                and data.get("name") == run.name):
            continue
        recorded = data.get("run")
        if isinstance(recorded, str) and Path(recorded).is_dir() and Path(recorded).resolve() != run.resolve():
            continue
        sha = (data.get("fingerprint") or {}).get("adapter_sha256")
        found.append({"file": str(path), "task": data.get("task"), "metric": data.get("metric"),
                      "score": data.get("score"), "n": data.get("n"), "split": data.get("split"),
                      "model": data.get("model"), "created": data.get("created"),
                      "adapter_matches": None if not (sha and adapter_sha) else sha == adapter_sha})
    return found


def method_of(run: Path, config: dict) -> tuple[dict, dict | None]:
    """(method, variant, description) from adapter_config.json, else from config.yaml; and the adapter's
    settings (None when there is no readable adapter_config.json, its error kept in the method entry)."""
    try:
        adapter = read_adapter_config(run)
    except UserError as err:
        error = None if not (run / ADAPTER_CONFIG).exists() else str(err)
        return ({"method": config.get("method"), "variant": config.get("variant"), "describe": config.get("method"),
                 "adapter_error": error}, None)
    return ({"method": adapter.method, "variant": adapter.variant, "describe": adapter.describe(),
             "base_model": adapter.base_model, "base_fingerprint": adapter.base_fingerprint},
            {"store_fingerprint": adapter.store_fingerprint})


def run_report(path: Path, results_dir: Path) -> dict:
    """Everything about ``runs/<name>/``: method, parameters, store match, training, curve, evaluations."""
    run = RunDir(path)
    config = run.read_config()
    checkpoint = checkpoint_info(path)
    method, adapter = method_of(path, config)
    params = count_parameters(path / ADAPTER_WEIGHTS) or count_parameters(path / CHECKPOINT_DIR / CHECKPOINT_WEIGHTS)
    cache = config.get("cache") or checkpoint["config"].get("cache")
    fingerprint = adapter["store_fingerprint"] if adapter else None
    adapter_sha = _sha16(path / ADAPTER_WEIGHTS)
    return {"kind": RUN, "path": str(path), "name": path.name, "method": method, "parameters": params,
            "store": store_match(cache, checkpoint["config"].get("store"), fingerprint),
            "training": training(run, checkpoint["step"]),
            "loss_curve": str(run.curve_path) if run.curve_path.is_file() else None,
            "adapter_sha256": adapter_sha, "results_dir": str(results_dir),
            "evaluations": evaluations(path, results_dir, adapter_sha),
            "config": config}


# --- output --------------------------------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    """1234567 -> '1.23 MB' (decimal units, as MB/s)."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} TB"  # unreachable


def _num(x: Any, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt) if isinstance(x, float) else str(x)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _kv(rows: list[tuple[str, str]], indent: str = "") -> list[str]:
    """`key   value` lines, keys padded to the widest (like `pip show`)."""
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in rows]


def _histogram_lines(hist: dict, width: int = 40) -> list[str]:
    edges, counts = hist["edges"], hist["counts"]
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    most = max(counts, default=0) or 1
    pad = max(len(s) for s in labels)
    return [f"  {label.rjust(pad)}  {'#' * round(width * c / most):<{width}}  {c}"
            for label, c in zip(labels, counts, strict=True)]


def _producer_rows(attrs: dict) -> list[tuple[str, str]]:
    """The attrs stage 1 records, grouped into readable lines (only those present); the rest one per line."""

    def line(main: str, *extra: tuple[str, str]) -> str:
        parts = [f"{label} {attrs[k]}" for label, k in extra if attrs.get(k) not in (None, "")]
        return f"{attrs[main]}" + (f" ({', '.join(parts)})" if parts else "")

    groups = [
        ("model", "model", [("revision", "model_revision"), ("fingerprint", "model_fingerprint")]),
        ("family", "family", []),
        ("task", "task", [("source", "task_source"), ("split", "split"), ("support split", "support_split")]),
        ("shots", "shots", [("demonstrations", "demo_strategy"), ("seed", "demo_seed")]),
        ("layer target", "layer_target", [("layers", "layers"), ("hidden", "hidden")]),
        ("topk logits", "topk", []),
        ("code version", "code_version", []),
        ("store schema", "schema_version", [("encoding", "encoding")]),
        ("created", "created", []),
    ]
    rows, used = [], set()
    for label, main, extra in groups:
        if main in attrs:
            rows.append((label, "none" if main == "topk" and not attrs[main] else line(main, *extra)))
            used |= {main, *(k for _, k in extra)}
    return rows + [(k, str(v)) for k, v in attrs.items() if k not in used]


def render_store(r: dict) -> str:
    """The store report as aligned plain text."""
    c, s, h, lay = r["completeness"], r["size"], r["token_lengths"], r["layout"]
    missing = ", ".join(map(str, c["shards_missing"][:12])) + (", ..." if len(c["shards_missing"]) > 12 else "")
    state = "complete" if c["complete"] else f"INCOMPLETE; shards not done: {missing}"
    lines = [f"teacher store {r['path']}", "", "produced by", *_kv(_producer_rows(r["producer"]), "  "), ""]
    lines += _kv([
        ("samples", f"{c['done']} of {c['planned']} done ({state})"),
        ("shards", f"{c['shards_done']} of {c['shards']} done ({lay['shard_size']} samples each)"),
        ("layout", f"N {lay['n_samples']} x T_max {lay['t_max']} x L {lay['layers']} x D {lay['hidden']}, "
                   f"{lay['shots']} shots"),
        ("size on disk", f"{human_bytes(s['on_disk_bytes'])} in {s['files']} files"),
        ("compression", f"{_num(s['compression_ratio'], '.3g')}x ({human_bytes(s['uncompressed_bytes'])} "
                        f"uncompressed in {human_bytes(s['stored_bytes'])} of chunk files)"),
    ])
    lines += _kv([(f"  {name}", f"{human_bytes(a['stored_bytes'])} stored, {human_bytes(a['uncompressed_bytes'])} "
                   f"uncompressed ({_num(a['ratio'], '.3g')}x), {_plural(a['files'], 'file')}")
                  for name, a in s["arrays"].items()])
    pad = "-" if h["padding_fraction"] is None else f"{100 * h['padding_fraction']:.0f}% of hs is padding"
    lines += ["", f"token lengths  min {_num(h['min'])}, mean {_num(h['mean'], '.1f')}, max {_num(h['max'])} "
                  f"(T_max {h['t_max']}; {pad})", *_histogram_lines(h)]
    lines += ["", *_norm_lines(r.get("layer_norms")), "", _verify_line(r.get("verify"))]
    return "\n".join(lines)


def _norm_lines(norms: dict | None) -> list[str]:
    if norms is None:
        return ["per-layer mean norm  not computed (--no-norms)"]
    if norms.get("error"):
        return ["per-layer mean norm  DAMAGED store: see the error below"]
    if norms.get("values") is None:
        return [f"per-layer mean norm  skipped: {norms['skipped']}"]
    png = norms.get("png") or norms.get("png_error")
    lines = [f"per-layer mean norm of the cached states (plot: {png})", "  layer  mean ||h||"]
    return lines + [f"  {i:>5}  {v:>#10.4g}" for i, v in enumerate(norms["values"])]


def _verify_line(v: dict | None) -> str:
    if v is None:
        return "verify  not run (--verify reads every chunk and checks its checksum)"
    if v["status"] != "intact":
        return "verify  DAMAGED: see the error below"
    scope = "" if v["complete"] else (f" (the store is incomplete: its {v['samples']} done samples of "
                                      f"{v['planned']} checked)")
    return (f"verify  intact{scope}: {_plural(v['samples'], 'sample')}, {_plural(v['files'], 'chunk file')}, "
            f"{_plural(v['hs_shards'], 'hs shard')}, "
            f"{human_bytes(v['bytes_read'])} read and checksummed in {v['seconds']:.2f} s "
            f"({v['mb_per_s']:.3g} MB/s)")


def render_run(r: dict) -> str:
    """The run report as aligned plain text."""
    m, p, st, t = r["method"], r["parameters"], r["store"], r["training"]
    params = ("-" if p is None else f"unreadable ({p['error']})" if "error" in p
              else f"{p['count']:,} in {p['tensors']} tensors ({human_bytes(p['bytes'])}, {p['file']})")
    variant = f" / {m['variant']}" if m.get("variant") and m["method"] == "mimic" and m["variant"] != "mimic" else ""
    method = f"{m['describe']}{variant}" + (f" (adapter_config.json unreadable: {m['adapter_error']})"
                                            if m.get("adapter_error") else "")
    last, first = t["last"] or {}, t["first"] or {}
    losses = (f"final loss {_num(t['final_loss'])} (align {_num(last.get('align'))}, gt {_num(last.get('gt'))}); "
              f"first step {_num(first.get('loss'))}") if t["last"] else "-"
    steps = (f"{_num(t['steps'])}" + ("" if t["finished"] else " logged (no summary.json: unfinished or killed)")
             + f", checkpoint at step {_num(t['checkpoint_step'])}")
    fit = t.get("fit")
    if fit:  # a training-free method: what its fit chose instead of steps and losses
        sweep = fit.get("sweep") or []
        layer = fit.get("layer")
        best = sweep[layer] if isinstance(layer, int) and 0 <= layer < len(sweep) else None
        steps = (f"fitted (no training): layer {_num(layer)} of {len(sweep)} tried, held-out score {_num(best, '.2f')}, "
                 f"on {_num(fit.get('fitting_prompts'))} prompts ({_num(fit.get('held_out_queries'))} held out); fit.json")
    rows = [("method", method), ("parameters", params),
            ("store", f"{st['path'] or '-'}: {st['status'].upper() if st['status'] != 'matches' else 'matches'}"
                      f" ({st['detail']})"),
            ("steps", steps), ("losses", losses),
            ("throughput", f"{_num(t['samples_per_s'], '.3g')} samples/s over {_num(t['elapsed_s'], '.1f')} s"),
            ("loss curve", r["loss_curve"] or "-")]
    lines = [f"run {r['path']}", "", *_kv(rows), "", f"evaluations in {r['results_dir']}/: "
             + (f"{len(r['evaluations'])}" if r["evaluations"] else "none found")]
    for e in r["evaluations"]:
        same = {True: "", False: "  [an earlier adapter]", None: ""}[e["adapter_matches"]]
        lines.append(f"  {e['task']}: {e['metric']} {_num(e['score'], '.2f')} on {e['n']} {e['split']} queries "
                     f"({e['created']}) {e['file']}{same}")
    return "\n".join(lines)


def _finite(x: Any) -> Any:
    """NaN / inf -> None, so that --json is strict JSON (a diverged run logs NaN losses)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def render_json(report: dict) -> str:
    return json.dumps(_finite(report), indent=2, default=str, allow_nan=False)


def render_text(report: dict) -> str:
    return render_store(report) if report["kind"] == STORE else render_run(report)


# --- the command ------------------------------------------------------------------------------------

def run(config: InspectConfig) -> dict:
    """`pipeline inspect`: detect the target, build its report, print it (text or --json); returns it."""
    path = store_location(config.target)  # a local path, or a store at an fsspec URL (s3://...)
    kind = detect(path)

    def emit(report: dict) -> None:
        print(render_json(report) if config.json else render_text(report), flush=True)

    if kind == STORE:
        return inspect_store(path, config, emit)
    given = [flag for flag, on in (("--verify", config.verify), ("--png", config.png)) if on]
    if given:
        raise UserError(f"{' and '.join(given)} apply to a teacher store, and {path} is a run directory; inspect "
                        "the run's store (the `store` line of `pipeline inspect RUN`) with them")
    report = run_report(path, Path(config.results_dir))
    emit(report)
    return report
