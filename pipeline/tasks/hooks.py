"""Small Python hooks named by a task YAML (``!function module.name``) and the YAML reading that makes them.

A task YAML may replace one of its parts by a function, as lmms-eval's task files do::

    prompt: !function utils.prompt          # f(example) -> the query text (instead of a template)
    postprocess: !function utils.clean      # f(generated text) -> the prediction
    metric: !function utils.score           # f(prediction, answers) -> a score in [0, 1] per example
    loader: !function utils.load            # f(config) -> {split: [Example, ...]}

``module`` is first looked up as ``module.py`` beside the YAML file that names it, then as an
importable module (``my_package.hooks.score``). A task YAML may also ``include:`` other YAML files
(paths relative to it, or the name of a shared template in the built-in task folder); the
including file's keys override the included ones'.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import UserError, YamlLoader

TAG = "!function"
INCLUDE_KEY = "include"


@dataclass(frozen=True)
class Hook:
    """``!function ref`` written in the YAML file ``source`` (whose folder holds ``ref``'s module file)."""

    ref: str
    source: Path
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __str__(self) -> str:
        return f"{TAG} {self.ref}"

    def _split(self) -> tuple[str, str]:
        module, _, name = self.ref.rpartition(".")
        if not module or not name:
            raise UserError(f"task file {self.source}: {self} must name module.function "
                            "(e.g. `!function utils.score` for score() in utils.py beside the YAML)")
        return module, name

    def _module_file(self) -> Path | None:
        module, _ = self._split()
        path = self.source.parent / (module.replace(".", "/") + ".py")
        return path if path.is_file() else None

    def resolve(self) -> Callable[..., Any]:
        """The function (imported once per hook); a missing module or name is a one-line ``UserError``."""
        if "fn" in self._cache:
            return self._cache["fn"]
        module_name, name = self._split()
        path = self._module_file()
        try:
            if path is not None:
                unique = "mimic_task_hooks_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
                spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[unique] = module  # dataclasses and pickling look a module up by name
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise UserError(f"task file {self.source}: {self}: no {module_name}.py beside it and no importable "
                            f"module {module_name!r} ({err}); put the file there or install the module") from err
        except Exception as err:  # the hook file's own error (syntax, an import inside it): name it
            where = path if path is not None else module_name
            raise UserError(f"task file {self.source}: {self}: importing {where} failed: "
                            f"{type(err).__name__}: {err}") from err
        fn = getattr(module, name, None)
        if not callable(fn):
            raise UserError(f"task file {self.source}: {self}: {module_name} has no function {name!r}; "
                            "define it there or fix the name")
        self._cache["fn"] = fn
        return fn

    def digest(self) -> str:
        """sha256 of the hook's module source (what a store records, so that an edited hook is noticed)."""
        if "digest" not in self._cache:
            path = self._module_file()
            if path is None:
                fn = self.resolve()
                module = sys.modules.get(fn.__module__)
                file = getattr(module, "__file__", None)
                path = Path(file) if file else None
            data = path.read_bytes() if path is not None and path.is_file() else self.ref.encode()
            self._cache["digest"] = hashlib.sha256(data).hexdigest()
        return self._cache["digest"]

    def identity(self) -> str:
        """``!function ref sha256:...``: the hook's name and the first 16 hex digits of its source digest."""
        return f"{self} sha256:{self.digest()[:16]}"


def describe(value: Any) -> Any:
    """A template or hook as it is recorded (stores, results): a hook by ``Hook.identity()``."""
    return value.identity() if isinstance(value, Hook) else value


def _loader(source: Path) -> type:
    import yaml

    class TaskYamlLoader(YamlLoader):
        """Safe YAML (numbers as YAML 1.2 reads them) plus ``!function module.name`` (a ``Hook`` resolved
        later, relative to ``source``)."""

    def function(loader: YamlLoader, node: yaml.Node) -> Hook:
        ref = loader.construct_scalar(node)
        if not isinstance(ref, str) or not ref.strip():
            raise yaml.constructor.ConstructorError(None, None, f"{TAG} needs module.function", node.start_mark)
        return Hook(ref.strip(), source)

    TaskYamlLoader.add_constructor(TAG, function)
    return TaskYamlLoader


def _parse(path: Path) -> dict[str, Any]:
    """One task YAML file as a mapping; every fault is a one-line ``UserError`` naming the file.

    A syntax error names the line and column (``yaml.MarkedYAMLError.problem_mark``).
    """
    import yaml

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader(path)) or {}  # noqa: S506 (SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise UserError(
            f"task file {path}{where}: invalid YAML: {detail}; fix the syntax there (a task file is a "
            "mapping of keys to values, e.g. `files: {support: support.jsonl}`)"
        ) from err
    except UnicodeDecodeError as err:
        raise UserError(
            f"task file {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it with UTF-8 encoding"
        ) from err
    except OSError as err:
        raise UserError(
            f"task file {path} cannot be read ({err.strerror or err}); give a readable YAML file"
        ) from err
    if not isinstance(data, dict):
        raise UserError(
            f"task file {path} holds {type(data).__name__}, expected a mapping of keys to values "
            "(e.g. `files: {support: support.jsonl}`)"
        )
    return data


def read_task_yaml(path: Path, templates: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task YAML with its ``include:`` files merged in (theirs first, in order; this file's keys win).

    An include is a path relative to the including file, or the name of a template in ``templates``
    (``_vqa`` or ``_vqa.yaml``). A missing include or a cycle is a one-line ``UserError``.
    """
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise UserError(f"task file {path}: includes itself ({chain}); remove the cycle")
    data = _parse(path)
    includes = data.pop(INCLUDE_KEY, [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i.strip() for i in includes):
        raise UserError(f"task file {path}: '{INCLUDE_KEY}' must be a file name or a list of file names, "
                        f"got {includes!r}")
    merged: dict[str, Any] = {}
    for name in includes:
        merged.update(read_task_yaml(_include_path(path, name, templates), templates, (*_seen, path)))
    merged.update(data)
    return merged


def _include_path(path: Path, name: str, templates: Path) -> Path:
    candidates = [path.parent / name, templates / name]
    if not name.endswith((".yaml", ".yml")):
        candidates += [path.parent / f"{name}.yaml", templates / f"{name}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        shared = sorted(p.stem for p in templates.glob("_*.yaml"))
        raise UserError(f"task file {path}: include {name!r} not found beside it or among the shared templates "
                        f"({', '.join(shared) or 'none'}); fix the name or the path")
    return found
