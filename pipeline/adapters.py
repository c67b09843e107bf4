"""Students on disk: ``adapter.safetensors`` + ``adapter_config.json`` (this module owns the format).

A student is one of the registered methods (``pipeline.methods``: MimIC with its variants, LIVE,
LoRA through PEFT, or a plug-in); its spec says which tensors it holds. The weights file holds only the
student's tensors — never base-model weights — and is read with safetensors (never a pickle, which
can run code when loaded). The config records the method, the shapes, and which base model (id,
revision, fingerprint) and teacher store produced it; loading into a model of other shapes fails
with a message naming both.

A LoRA student is written a second time in PEFT's own format, into the subdirectory ``peft/``
(``PEFT_DIR``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, as
``PeftModel.save_pretrained`` writes them), so that ``peft.PeftModel.from_pretrained(base,
"<dir>/peft")`` (or ``"<dir>", subfolder="peft"``; a hub id alike) loads it. PEFT's config has the
same file name as ours, hence the subdirectory; the top level stays this pipeline's format, and a
directory without ``peft/`` (runs saved before it existed, other methods) reads as before. Nothing of
this pipeline reads ``peft/``. ``model_card`` is the ``README.md`` of ``Student.save_pretrained``;
``locate_adapter`` finds a student given as a directory or a Hugging Face Hub id (downloading its two
files).

Every reader of a student (training resume, `pipeline evaluate`) goes through
``read_adapter_config`` and ``read_adapter_tensors``, which refuse — with one-line ``AdapterError``
messages naming the file and the problem — a config of wrong types, a truncated or non-safetensors
weights file, missing or unexpected tensors, shapes that disagree with the config, non-floating
dtypes, and NaN or infinite values (a diverged training run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import UserError
from pipeline.methods import REGISTRY, UnknownMethodError, get_method

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
PEFT_DIR = "peft"
"""Subdirectory holding a LoRA student in PEFT's own format (its config file has our config's name)."""
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
"""PEFT's file names (``peft.utils.constants.CONFIG_NAME`` / ``SAFETENSORS_WEIGHTS_NAME``)."""
_PEFT_TMP = ".tmp-"
MODEL_CARD = "README.md"
"""The model card ``Student.save_pretrained`` writes (the Hub shows it as the repository's page)."""
RESTORE = "restore the run's files or re-train it with `pipeline train-student`"
"""How to fix a damaged student: the end of most messages below."""


class AdapterError(UserError):
    """A student file that is missing, malformed, or made for another model."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_problem(config: AdapterConfig) -> str | None:
    """What is wrong with a config's values (types, ranges, the method's own settings), or None."""
    if not isinstance(config.method, str):
        return f"unknown student method {config.method!r}; expected a method name, one of {', '.join(REGISTRY.names())}"
    try:
        spec = get_method(config.method)
    except UnknownMethodError as err:
        return str(err)
    for key in ("num_layers", "num_heads", "head_dim", "hidden_size"):
        value = getattr(config, key)
        if not _is_int(value) or value < 1:
            return f"'{key}' is {value!r}, expected a positive integer"
    for key in ("base_model", "base_fingerprint"):
        if not isinstance(getattr(config, key), str):
            return f"'{key}' is {getattr(config, key)!r}, expected a string"
    if config.base_revision is not None and not isinstance(config.base_revision, str):
        return f"'base_revision' is {config.base_revision!r}, expected a string or null"
    for key in ("store_fingerprint", "lora", "settings"):
        if not isinstance(getattr(config, key), dict):
            return f"'{key}' is {getattr(config, key)!r}, expected a mapping"
    if not _is_int(config.format_version):
        return f"'format_version' is {config.format_version!r}, expected an integer"
    problem = spec.check(config)  # the method's own settings first: its message is the more telling
    if problem is None and not isinstance(config.variant, str):
        problem = f"'variant' is {config.variant!r}, expected a string"
    return problem


@dataclass(frozen=True)
class AdapterConfig:
    """What a student is and what it was made for.

    method: a registered method (mimic, live, lora, hificl, mimic-lora, tv, fv, plug-ins). variant: the MimIC
    variant (``mimic`` for the others).
    num_layers, num_heads, head_dim, hidden_size: the decoder geometry it was built for.
    base_model: the model id or alias; base_revision / base_fingerprint: what exactly was loaded.
    store_fingerprint: the teacher store's fingerprint (empty for students trained online).
    lora: the method's own settings: PEFT LoRA's (r, alpha, dropout, target modules) for ``lora`` and
    ``mimic-lora``, HiFICL's (n virtual keys, rank) for ``hificl``.
    settings: other methods' own settings (the layer of a Task Vector; the layer and heads of a Function
    Vector); absent ({}) in files written before it existed.
    """

    method: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    variant: str = "mimic"
    base_model: str = ""
    base_revision: str | None = None
    base_fingerprint: str = ""
    store_fingerprint: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    format_version: int = ADAPTER_FORMAT_VERSION

    def __post_init__(self):
        problem = _config_problem(self)
        if problem:
            raise AdapterError(problem)

    @property
    def shapes(self) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_heads, self.head_dim, self.hidden_size)

    def describe(self) -> str:
        """``mimic/head_shared``, ``live`` or ``lora r=16``: the kind of student, for messages."""
        return get_method(self.method).describe(self)


def build_student(config: AdapterConfig) -> nn.Module:
    """Fresh student parameters (identity at init) of a method whose parameters are one module
    (MimIC heads, LIVE vectors); LoRA's live inside the model."""
    spec = get_method(config.method)
    if spec.build is None:
        raise AdapterError(f"{config.method} students have no parameter module of their own (PEFT builds LoRA "
                           "inside the model); attach one with pipeline.students.new_student")
    return spec.build(config)


def _ours(peft_dir: Path) -> bool:
    """Whether ``peft_dir`` holds only what ``_save_peft`` writes (so it may be replaced or removed)."""
    return all(p.name in (PEFT_CONFIG, PEFT_WEIGHTS) or p.name.startswith(_PEFT_TMP) for p in peft_dir.iterdir())


def _save_peft(directory: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """A LoRA student's PEFT files into ``directory/peft`` (atomically per file); for another method,
    remove a ``peft/`` left by a LoRA student saved there before (when it holds nothing else), so that
    it never stands beside a student it does not describe."""
    target = directory / PEFT_DIR
    if config.method != "lora":
        if target.is_dir() and _ours(target):
            shutil.rmtree(target)
        return
    from pipeline.methods.lora import to_peft

    lora, peft_tensors = to_peft(config, tensors)
    target.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_PEFT_TMP, dir=target))
    try:
        lora.save_pretrained(str(tmp))  # PEFT's own writer of its adapter_config.json
        save_file(peft_tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})  # as PEFT saves
        for name in (PEFT_WEIGHTS, PEFT_CONFIG):
            (tmp / name).replace(target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(directory: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` into ``directory`` atomically per file
    (a LoRA student also into ``peft/``, in PEFT's format, first: ours are written last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _save_peft(directory, config, plain)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(plain, str(tmp), metadata={"format_version": str(ADAPTER_FORMAT_VERSION)})
    tmp.replace(directory / ADAPTER_WEIGHTS)
    tmp_cfg = directory / (ADAPTER_CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
    tmp_cfg.replace(directory / ADAPTER_CONFIG)
    return directory


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """Read and validate ``adapter_config.json`` (keys, types and ranges; one-line errors)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {directory}; is it a run directory of `pipeline train-student`?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {RESTORE}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} cannot be read ({err}); expected a readable UTF-8 JSON file: {RESTORE}") from err
    if not isinstance(data, dict):
        raise AdapterError(f"{path} holds a JSON {type(data).__name__}, expected an object of adapter settings; {RESTORE}")
    if "peft_type" in data and "method" not in data:
        raise AdapterError(f"{path} is PEFT's adapter config ({data['peft_type']}), not a student of this pipeline: "
                           f"pass the student's directory (the parent of its {PEFT_DIR}/), or load a PEFT adapter "
                           "with peft.PeftModel.from_pretrained")
    known = [f.name for f in fields(AdapterConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise AdapterError(f"{path} has unknown keys {unknown} (known: {', '.join(known)}); written by a newer "
                           "version of the pipeline? update it, or remove those keys")
    required = [f.name for f in fields(AdapterConfig) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise AdapterError(f"{path} misses the keys {missing}; {RESTORE}")
    version = data.get("format_version", ADAPTER_FORMAT_VERSION)
    if _is_int(version) and version > ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {version}; this code reads up to {ADAPTER_FORMAT_VERSION}: "
                           "update the pipeline")
    try:
        return AdapterConfig(**data)
    except AdapterError as err:
        raise AdapterError(f"{path}: {err}; {RESTORE}") from err


def _foreign_format(path: Path) -> str | None:
    """'a pickle' / 'a zip (torch.save) archive' when the file starts like one, else None."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "zip archive (torch.save format, which holds pickles)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "Python pickle"
    return None


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated, damaged or pickle file is an ``AdapterError``.

    Only safetensors is ever parsed: a pickle renamed to ``.safetensors`` is recognised and refused,
    never unpickled.
    """
    path = Path(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        foreign = _foreign_format(path)
        if foreign:
            raise AdapterError(f"{path} is a {foreign}, not a safetensors file; it was not loaded (pickles can "
                               f"run code): {RESTORE}") from err
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AdapterError(f"{path} is not a readable safetensors file ({reason}): it is truncated or damaged; "
                           f"{RESTORE}") from err
    except OSError as err:
        raise AdapterError(f"{path} cannot be read ({err.strerror or err}); expected a readable safetensors "
                           f"file: check its permissions or {RESTORE}") from err


def expected_shapes(config: AdapterConfig, model: nn.Module | None = None) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> shape a student of ``config`` holds (``None``: a size only the model knows), as its
    method declares them (``MethodSpec.shapes``)."""
    try:
        return get_method(config.method).shapes(config, model)
    except AdapterError:
        raise
    except UserError as err:
        raise AdapterError(f"{ADAPTER_CONFIG}: {err}") from err


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("any" if s is None else str(s) for s in shape) + "]"


def _some(names: list[str]) -> str:
    return str(names[:4])[:-1] + (f", ... {len(names) - 4} more]" if len(names) > 4 else "]")


def check_adapter_tensors(path: str | Path, tensors: dict[str, torch.Tensor], config: AdapterConfig,
                          model: nn.Module | None = None) -> None:
    """Refuse tensors that are not the student ``config`` describes: names, shapes, dtype, finiteness."""
    expected = expected_shapes(config, model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{path} does not hold the tensors of the {config.describe()} student its {ADAPTER_CONFIG} describes: "
            f"missing {_some(missing)}, unexpected {_some(unexpected)}; the two files do not belong together: "
            f"{RESTORE}")
    for name, want in expected.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
            raise AdapterError(
                f"{path}: tensor '{name}' has shape {list(got)}, but {ADAPTER_CONFIG} ({config.describe()}, "
                f"layers={config.num_layers}, heads={config.num_heads}, head_dim={config.head_dim}, "
                f"hidden={config.hidden_size}) expects {_shape_text(want)}; {RESTORE}")
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            raise AdapterError(f"{path}: tensor '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                               f"expected a floating-point dtype (float32, bfloat16, float16); {RESTORE}")
    for name, tensor in sorted(tensors.items()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterError(f"{path}: tensor '{name}' has {bad} non-finite values (NaN or inf) of {tensor.numel()}, "
                               "expected finite numbers; the training diverged or the file is damaged: re-train "
                               "the run with `pipeline train-student` (e.g. a lower --lr)")


def read_adapter_tensors(directory: str | Path, config: AdapterConfig | None = None,
                         model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read ``adapter.safetensors`` (safetensors only: never a pickle) and check it against ``config``
    (default: the directory's ``adapter_config.json``) and, for LoRA sizes, ``model``."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {directory}; is it a run directory of `pipeline train-student`?")
    tensors = read_tensor_file(path)
    check_adapter_tensors(path, tensors, config if config is not None else read_adapter_config(directory), model)
    return tensors


def check_fits(config: AdapterConfig, geometry: tuple[int, int, int, int], model_name: str) -> None:
    """Refuse a student built for other shapes, naming both."""
    if tuple(config.shapes) != tuple(geometry):
        names = ("layers", "heads", "head_dim", "hidden")
        got = ", ".join(f"{n}={v}" for n, v in zip(names, geometry, strict=True))
        want = ", ".join(f"{n}={v}" for n, v in zip(names, config.shapes, strict=True))
        raise AdapterError(
            f"adapter was made for {config.base_model or 'another model'} ({want}) "
            f"but the model {model_name} has {got}; evaluate it on the model it was trained on"
        )


def load_student(directory: str | Path, geometry: tuple[int, int, int, int], model_name: str) -> tuple[AdapterConfig, nn.Module]:
    """Load a MimIC or LIVE student checked against ``geometry`` = (layers, heads, head_dim, hidden)."""
    config = read_adapter_config(directory)
    check_fits(config, geometry, model_name)
    tensors = read_adapter_tensors(directory, config)
    module = build_student(config)
    module.load_state_dict(tensors)  # names and shapes were checked above
    return config, module


def _hub_id_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Hub repository id (``user/name``), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", ".", "~")) or "\\" in name:
        return "it is a path"
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err).splitlines()[0]
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def locate_adapter(name: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                   cache_dir: str | Path | None = None) -> Path:
    """The local directory of the student ``name``: a directory (a run directory, or one written by
    ``Student.save_pretrained``) as it is, or a Hugging Face Hub id whose ``adapter_config.json`` and
    ``adapter.safetensors`` are downloaded at ``revision`` (``huggingface_hub.snapshot_download``: the
    Hugging Face cache, ``HF_HUB_OFFLINE`` and ``token`` as everywhere). What can be found is not yet
    checked: ``read_adapter_config`` / ``read_adapter_tensors`` do that. One-line ``AdapterError`` for
    a missing directory, a file, a repository or revision that cannot be fetched, one without a student."""
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    text = str(name)
    local = Path(text).expanduser()
    if local.is_dir():
        if revision is not None:
            raise AdapterError(f"revision={revision!r} was given but {text} is a local directory; a revision "
                               "applies to hub ids only: drop it, or pass the hub id")
        return local
    if local.exists():
        raise AdapterError(f"{text} is a file; pass the directory holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                           "(a run directory of `pipeline train-student`) or a hub id")
    problem = None if isinstance(name, str) else "it is a path"
    problem = problem or _hub_id_problem(text)
    if problem:
        raise AdapterError(f"no student directory {text} (and not a hub id: {problem}); expected a run directory "
                           "of `pipeline train-student`, a directory written by Student.save_pretrained, or a hub "
                           "id user/name")
    at = f" at revision {revision!r}" if revision else ""
    try:
        found = huggingface_hub.snapshot_download(text, revision=revision, token=token, cache_dir=cache_dir,
                                                  allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS],
                                                  library_name="mimic-pipeline")
    except GatedRepoError as err:
        raise AdapterError(f"hub repository '{text}' is gated: accept its conditions on huggingface.co and "
                           "log in (`hf auth login`) or pass token=") from err
    except RepositoryNotFoundError as err:
        raise AdapterError(f"no local directory {text}, and hub repository '{text}' was not found (or is private): "
                           "check the path or the id; for a private repository log in (`hf auth login`) or "
                           "pass token=") from err
    except RevisionNotFoundError as err:
        raise AdapterError(f"hub repository '{text}' has no revision {revision!r}; pass an existing branch, tag "
                           "or commit") from err
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise AdapterError(f"no local directory {text}, and hub id '{text}'{at} cannot be fetched: {why} and it is "
                           "not in the Hugging Face cache; pass a local student directory, or fetch it once "
                           "online") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise AdapterError(f"cannot fetch the student '{text}'{at} from the hub ({_first_line(err)}); check the id "
                           "and the network, or pass a local student directory") from err
    directory = Path(found)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (directory / f).is_file()]
    if missing:
        raise AdapterError(f"hub repository '{text}'{at} holds no {' and no '.join(missing)}: it is not a student "
                           "of this pipeline (Student.push_to_hub uploads one)")
    return directory


def _hub_model(name: str) -> str | None:
    """``name`` (an alias of ``pipeline.models.MODEL_ALIASES`` resolved) when it is a hub id ``user/name``,
    else None (a local path, an embedded model): the ``base_model`` of a model card's metadata."""
    from pipeline.models import MODEL_ALIASES

    name = MODEL_ALIASES.get(name, name)
    if "/" not in name or Path(name).expanduser().exists() or _hub_id_problem(name):
        return None
    return name


def model_card(config: AdapterConfig, parameters: int, name: str | None = None) -> str:
    """``README.md`` of a saved student (Hub metadata + a short page): method, base model, parameter
    count, the teacher store it was trained on (when recorded), how to load it. ``name``: the hub id
    or directory readers load it from (a placeholder when None)."""
    from huggingface_hub import ModelCard, ModelCardData

    lora = config.method == "lora"
    hub_base = _hub_model(config.base_model)
    tags = list(dict.fromkeys(["mimic-pipeline", "mimic", config.method] + (["peft", "lora"] if lora else [])))
    data = ModelCardData(base_model=hub_base, tags=tags)
    base = f"`{config.base_model}`" if config.base_model else "a model not recorded"
    if config.base_revision:
        base += f" (revision `{config.base_revision}`)"
    store = config.store_fingerprint
    if store:
        parts = [f"task `{store['task']}`" if store.get("task") else "",
                 f"{store['shots']}-shot ICL teacher" if store.get("shots") is not None else "",
                 f"{store['n']} queries" if store.get("n") is not None else "",
                 f"states at `{store['layer_target']}`" if store.get("layer_target") else ""]
        trained = ", ".join(p for p in parts if p) or "a teacher store (settings not recorded)"
    else:
        trained = "no teacher store recorded (online training, or built in-process)"
    where = name or "<this directory or hub id>"
    rows = [("method", f"`{config.describe()}`"), ("base model", base),
            ("base fingerprint", f"`{config.base_fingerprint}`" if config.base_fingerprint else "not recorded"),
            ("trainable parameters", f"{parameters:,}"), ("trained on", trained)]
    peft = (f"\nIn PEFT's format too (`{PEFT_DIR}/`): `peft.PeftModel.from_pretrained(base_model, \"{where}\", "
            f"subfolder=\"{PEFT_DIR}\")`.\n") if lora else ""
    body = "\n".join([
        f"# {config.describe()} student of {config.base_model or 'a base model'}", "",
        "A student of the [MimIC pipeline](https://arxiv.org/abs/2504.08851) (*Mimic In-Context Learning for "
        "Multimodal Tasks*): a small module attached to the frozen base model in place of many-shot "
        "in-context demonstrations.", "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Use", "", "```python", "from pipeline import Student, load_base_model", "",
        f"loaded = load_base_model(\"{config.base_model or '<base model>'}\")",
        f"student = Student.from_pretrained(\"{where}\", loaded)", "```", peft])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def save_model_card(directory: str | Path, config: AdapterConfig, parameters: int, name: str | None = None) -> Path:
    """Write ``model_card`` as ``directory/README.md`` (atomically)."""
    path = Path(directory) / MODEL_CARD
    tmp = path.with_name(MODEL_CARD + ".tmp")
    tmp.write_text(model_card(config, parameters, name), encoding="utf-8")
    tmp.replace(path)
    return path
