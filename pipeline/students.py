"""One interface over every student method (``pipeline.methods``): MimIC heads, LIVE vectors,
LoRA (PEFT) and plug-ins.

``new_student`` builds a fresh one on a model (in training mode), ``load_student_dir`` reloads a
saved one (in inference mode: no LoRA dropout, so evaluation is deterministic); both return a
``Student`` with ``trainable()``, ``disabled()`` (run the base model), ``train()`` / ``eval()``,
``save(dir)`` and ``detach()`` (the model is exactly the base model again, requires_grad flags
included). What a method does is its ``MethodSpec``'s business; this module only delegates.

Students are also Hub artifacts, in the style of ``huggingface_hub`` / PEFT:
``Student.from_pretrained(directory_or_hub_id, model)`` (a hub id's two adapter files are downloaded,
then loaded through ``load_student_dir`` with every check), ``student.save_pretrained(directory)``
(the run directory's files, plus a ``README.md`` model card) and ``student.push_to_hub(repo_id)``
(``save_pretrained`` into a temporary directory uploaded in one commit by ``HfApi.upload_folder``).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.adapters import (
    AdapterConfig,
    check_fits,
    locate_adapter,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
    save_model_card,
)
from pipeline.config import UserError
from pipeline.methods import Attachment, get_method


def geometry_tuple(geometry: Any) -> tuple[int, int, int, int]:
    return (geometry.num_layers, geometry.num_heads, geometry.head_dim, geometry.hidden_size)


_DELEGATED = frozenset({"trainable", "tensors", "load_tensors", "disabled"})


@dataclass
class Student:
    """A student of ``config.method`` attached to ``model`` through its method's ``attachment``."""

    config: AdapterConfig
    model: nn.Module
    attachment: Attachment

    @property
    def module(self) -> nn.Module | None:
        """The parameter module of methods that have one (MimIC, LIVE), else None (LoRA)."""
        return getattr(self.attachment, "module", None)

    def __getattr__(self, name: str) -> Any:
        """``trainable()``, ``tensors()``, ``load_tensors(t)``, ``disabled()`` (run the base model inside
        the block: teacher forwards, zero-shot baselines) are the attachment's own."""
        if name in _DELEGATED:
            return getattr(self.attachment, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def train(self, mode: bool = True) -> Student:
        """The student's own modules in training (LoRA dropout on) or inference mode; the base model
        keeps its own mode. Returns self."""
        self.attachment.train(mode)
        return self

    def eval(self) -> Student:
        """Inference mode (no dropout): what every evaluation needs; returns self."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.attachment.training

    def save(self, directory: str | Path, **info: Any) -> Path:
        """Write the student's files (``pipeline.adapters``: ``adapter.safetensors`` +
        ``adapter_config.json``, and ``peft/`` for LoRA) into ``directory``; ``info`` overrides config
        entries. What ``pipeline train-student`` writes into its run directory."""
        return save_adapter(directory, replace(self.config, **info), self.tensors())

    def num_parameters(self) -> int:
        """How many numbers the student holds (what its files store)."""
        return sum(t.numel() for t in self.tensors().values())

    def save_pretrained(self, directory: str | Path, **info: Any) -> Path:
        """``save(directory)`` plus a ``README.md`` model card (method, base model, parameter count, the
        teacher store it was trained on); ``Student.from_pretrained(directory, model)`` loads it back."""
        return self._save_pretrained(directory, None, **info)

    def _save_pretrained(self, directory: str | Path, name: str | None, **info: Any) -> Path:
        path = self.save(directory, **info)
        save_model_card(path, replace(self.config, **info), self.num_parameters(), name)
        return path

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
        """Upload ``save_pretrained``'s files to the Hub repository ``repo_id`` (created if missing, as
        ``private`` asks) in one commit; returns ``huggingface_hub``'s ``CommitInfo``."""
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

        refused = (HfHubHTTPError, LocalTokenNotFoundError, ConnectionError, ValueError)
        api = huggingface_hub.HfApi(token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        except refused as err:
            raise _push_error(repo_id, err) from err
        with tempfile.TemporaryDirectory(prefix="mimic-student-") as tmp:
            self._save_pretrained(tmp, repo)
            try:
                return api.upload_folder(repo_id=repo, folder_path=tmp, repo_type="model", revision=revision,
                                         commit_message=commit_message or f"Upload {self.config.describe()} student",
                                         create_pr=create_pr)
            except refused as err:
                raise _push_error(repo_id, err) from err

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, model: Any, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None) -> Student:
        """Attach the saved student ``path_or_hub_id`` (a run directory, a ``save_pretrained``
        directory or a Hub id, at ``revision``) to ``model`` in inference mode, with every check of
        ``load_student_dir`` (shapes, tensor names, NaN). ``model``: the ``Loaded`` bundle of
        ``pipeline.load_base_model`` (warns when its weights are not the ones the student was trained
        on) or a transformers model (its attention is then routed through MimIC's function as
        ``wrap_model`` does, and stays so after ``detach()``: the stock sdpa kernel, plus MimIC's shift
        only where heads are attached)."""
        from pipeline.attention import ATTN_NAME, route_attention
        from pipeline.families import attention_geometry, family_for
        from pipeline.families.base import decoder_layers

        directory = locate_adapter(path_or_hub_id, revision=revision, token=token, cache_dir=cache_dir)
        unroute = None
        if isinstance(model, nn.Module):
            module, source = model, None
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            routed = getattr(getattr(decoder_layers(model)[0].self_attn, "config", None), "_attn_implementation", None)
            if routed != ATTN_NAME:
                family = family_for(model.config)
                route_attention(model, family.attn_implementation(ATTN_NAME))
                unroute = partial(route_attention, model, family.attn_implementation(routed or "sdpa"))
        else:  # a pipeline.runtime.Loaded
            module, source = model.model, model.source
            name = source.alias
        try:
            student = load_student_dir(directory, module, attention_geometry(module), name)
        except BaseException:
            if unroute is not None:  # a refused student leaves the model as it came
                unroute()
            raise
        trained_on = student.config.base_fingerprint
        if source is not None and trained_on and trained_on != source.fingerprint:
            warnings.warn(f"the student {path_or_hub_id} was trained on {student.config.base_model} ({trained_on}), "
                          f"but {name} is {source.fingerprint}: other weights", stacklevel=2)
        return student

    def detach(self) -> None:
        """Remove the student; the model is the base model again."""
        self.attachment.detach()


def _push_error(repo_id: str, err: BaseException) -> UserError:
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
    return UserError(f"cannot push the student to hub repository '{repo_id}' ({reason}); check the id, log in "
                     "with `hf auth login` or pass token=, and unset HF_HUB_OFFLINE")


def new_student(method: str, variant: str, model: nn.Module, geometry: Any, base_model: str = "", **info: Any) -> Student:
    """A fresh student of ``method`` (the identity at step 0 where the method allows) attached to
    ``model``, in training mode. ``variant`` is MimIC's; other methods record ``mimic`` there."""
    spec = get_method(method)
    layers, heads, head_dim, hidden = geometry_tuple(geometry)
    settings = {"variant": "mimic", **spec.settings(model, variant)}
    config = AdapterConfig(method=method, num_layers=layers, num_heads=heads, head_dim=head_dim,
                           hidden_size=hidden, base_model=base_model, **settings, **info)
    return Student(config, model, spec.attach(config, model)).train()


def load_student_dir(directory: str | Path, model: nn.Module, geometry: Any, model_name: str) -> Student:
    """Reload a saved student onto ``model`` in inference mode; refuses one made for other shapes, or
    whose tensors are not what its config describes, naming both. ``.train()`` to train it further."""
    config = read_adapter_config(directory)
    check_fits(config, geometry_tuple(geometry), model_name)
    tensors = read_adapter_tensors(directory, config, model)
    student = Student(config, model, get_method(config.method).attach(config, model))
    try:
        student.load_tensors({k: v.to(next(model.parameters()).device) for k, v in tensors.items()})
    except BaseException:
        student.detach()  # the caller gets no student to detach: leave the model as it came
        raise
    return student.eval()
