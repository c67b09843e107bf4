"""Shared fixtures: offline hub settings, tiny models of every family, synthetic images."""

from __future__ import annotations

import os

# before anything imports transformers / huggingface_hub: never touch the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from typing import Any, NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import FAMILIES, build_tiny  # noqa: E402
from tiny_models import synthetic_image as _synthetic_image

# Tiny models are latency-bound: with 2 intra-op threads on a shared 2-core machine a 32-wide forward
# took 0.4-0.6 s (threads spin against other processes), with 1 thread 2-4 ms.
torch.set_num_threads(1)


class TinyFamily(NamedTuple):
    """A tiny model of one family: ``name`` (its model_type), model, processor and ``Family``."""

    name: str
    model: Any
    processor: Any
    family: Any


def tiny(name: str) -> TinyFamily:
    """The cached tiny model of ``name``; skips the test when an optional dependency is missing."""
    from pipeline.families import family_for

    try:
        model, processor = build_tiny(name)
    except ImportError as e:  # SmolVLM's processor needs num2words
        pytest.skip(f"tiny {name} cannot be built here: {e}")
    return TinyFamily(name, model, processor, family_for(model.config))


@pytest.fixture(params=FAMILIES)
def tiny_family(request: pytest.FixtureRequest) -> TinyFamily:
    """Each supported family in turn (``name``, ``model``, ``processor``, ``family``)."""
    return tiny(request.param)


@pytest.fixture
def hf_cache(tmp_path) -> str:
    """A fresh HuggingFace datasets cache directory for a task test."""
    return str(tmp_path / "hf-cache")


@pytest.fixture
def no_data_env(monkeypatch) -> None:
    """No MIMIC_DATA from the environment: data roots come from the test alone."""
    monkeypatch.delenv("MIMIC_DATA", raising=False)


@pytest.fixture
def synthetic_image() -> Any:
    """``synthetic_image(seed, size=(56, 56))``: a seeded small PIL RGB image with drawn shapes."""
    return _synthetic_image


# ---------------------------------------------------------------------------------------------
# `python -m pipeline ...` without paying torch's import in every process

# A server process imports what a `pipeline` command that loads a model imports, then forks one
# child per command. The child is a process of its own (own pid, locks, exit status, stdout and
# stderr); it runs the command exactly as `python -m pipeline ARGS` (or `python -c CODE ARGS`) would:
# the module as __main__ with sys.argv[0] its file, an uncaught exception printed by the interpreter
# (exit 1), SystemExit's code as the exit status, atexit and flushing at interpreter exit. A module
# that fails to import in the server fails again, at the same place, in the child's own import.
_SERVER = r"""
import json, os, sys
_requests = os.fdopen(os.dup(0), "rb", buffering=0)
_replies = os.fdopen(os.dup(1), "wb", buffering=0)
_fd = os.open(os.devnull, os.O_RDONLY); os.dup2(_fd, 0); os.close(_fd)
os.dup2(2, 1)  # the server's own output (none expected) goes to its log, never into the replies
for _name in json.loads(sys.argv[1]):
    try:
        __import__(_name)
    except BaseException:
        pass
import gc
gc.freeze()  # what was imported stays shared with the children: their collections never walk (copy) it
_line = _requests.readline()
while _line:
    _req = json.loads(_line)
    sys.stdout.flush(); sys.stderr.flush()
    _pid = os.fork()
    if _pid == 0:
        break
    _replies.write(b"%d\n" % _pid)
    _, _status = os.waitpid(_pid, 0)
    _replies.write(b"%d\n" % os.waitstatus_to_exitcode(_status))
    _line = _requests.readline()
else:
    sys.exit(0)
_requests.close(); _replies.close()
os.chdir(_req["cwd"])
os.environ.clear()
os.environ.update(_req["env"])
for _target, _path in ((1, _req["stdout"]), (2, _req["stderr"])):
    _fd = os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.dup2(_fd, _target); os.close(_fd)
if _req.get("code") is None:
    import runpy
    sys.argv = ["-m", *_req["args"]]
    sys.path[0] = os.getcwd()
    del _name, _requests, _replies, _line, _req, _pid, _fd, _target, _path
    runpy._run_module_as_main("pipeline")
else:
    sys.argv = ["-c", *_req["args"]]
    sys.path[0] = ""
    exec(compile(_req["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

_WARM_MODULES = ["torch", "transformers", "transformers.modeling_utils", "zarr", "safetensors.torch",
                 "matplotlib.pyplot", "pipeline.cli", "stages.teacher_cache", "stages.train_student",
                 "stages.evaluate"]


class WarmProcess:
    """One command run by a ``WarmPipeline`` server; the part of ``subprocess.Popen`` tests use."""

    def __init__(self, server: Any, args: list, out: Any, err: Any):
        self._server, self.args, self._out, self._err = server, args, out, err
        self.pid = int(server.readline())
        self.returncode: int | None = None

    def _finish(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            line = self._server.readline(timeout)
            if line is None:
                return None
            self.returncode = int(line)
            self._server.release()
        return self.returncode

    def poll(self) -> int | None:
        return self._finish(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._finish(timeout)
        if code is None:
            import subprocess

            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended (and was reaped) before its exit status was read: as Popen does
                pass

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def stdout(self) -> str:
        return self._out.read_text(encoding=_locale_encoding())

    def stderr(self) -> str:
        return self._err.read_text(encoding=_locale_encoding())


def _locale_encoding() -> str:
    import locale

    return locale.getpreferredencoding(False)  # what subprocess's text mode decodes with


class _Server:
    def __init__(self, pool: Any, env: dict, log: Any):
        import json
        import subprocess
        import sys
        from pathlib import Path

        self._pool, self._buf, self.env = pool, b"", env
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, json.dumps(_WARM_MODULES)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         cwd=Path(__file__).resolve().parents[1], bufsize=0)

    def send(self, request: dict) -> None:
        import json

        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def readline(self, timeout: float | None = None) -> str | None:
        import select
        import time

        end = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError(f"the warm pipeline server exited ({self.proc.wait()})")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def release(self) -> None:
        self._pool.release(self)

    def close(self) -> None:
        """Ask the server to exit (it does once its command, if any, has ended); ``join`` waits for it."""
        self.proc.stdin.close()

    def join(self) -> None:
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


class WarmPipeline:
    """``run``/``popen`` the ``pipeline`` command (or a ``python -c`` script) in a fresh process that
    starts with torch, transformers and the stages imported: each call is still a process of its
    own, forked from a server started with the same environment (its pid can be signalled)."""

    def __init__(self, tmp: Any):
        import threading

        self._tmp, self._idle, self._all, self._n = tmp, {}, [], 0
        self._lock = threading.Lock()

    def prestart(self, env: dict, n: int = 1) -> None:
        """Start ``n`` servers for ``env`` now, so their imports overlap the caller's own set-up."""
        with self._lock:
            idle = self._idle.setdefault(self._key(env), [])
            while len(idle) < n:
                idle.append(self._new(env))

    def _new(self, env: dict) -> _Server:
        self._n += 1
        server = _Server(self, dict(env), self._tmp / f"server{self._n}.log")
        self._all.append(server)
        return server

    @staticmethod
    def _key(env: dict) -> frozenset:
        # pytest sets PYTEST_CURRENT_TEST per test; it is read at run time only (each command gets its
        # exact environment), so servers of environments that differ only in it are shared
        return frozenset((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST")

    def _acquire(self, env: dict) -> _Server:
        with self._lock:
            idle = self._idle.setdefault(self._key(env), [])
            return idle.pop() if idle else self._new(env)

    def release(self, server: _Server) -> None:
        with self._lock:
            self._idle[self._key(server.env)].append(server)

    def popen(self, args: list, *, cwd: Any, env: dict, code: str | None = None) -> WarmProcess:
        import sys

        args = [str(a) for a in args]
        with self._lock:
            self._n += 1
            out, err = self._tmp / f"{self._n}.out", self._tmp / f"{self._n}.err"
        server = self._acquire(env)
        server.send({"args": args, "cwd": str(cwd), "env": dict(env), "stdout": str(out), "stderr": str(err),
                     "code": code})
        argv = [sys.executable, "-c", code, *args] if code is not None else [sys.executable, "-m", "pipeline", *args]
        return WarmProcess(server, argv, out, err)

    def run(self, args: list, *, cwd: Any, env: dict, timeout: float | None = None,
            code: str | None = None) -> Any:
        """Like ``subprocess.run(..., capture_output=True, text=True)``: a CompletedProcess."""
        import subprocess

        proc = self.popen(args, cwd=cwd, env=env, code=code)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout(), proc.stderr())

    def close(self) -> None:
        for server in self._all:
            server.close()
        for server in self._all:
            server.join()


@pytest.fixture(scope="session")
def warm_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A ``WarmPipeline``: the ``pipeline`` command in processes that skip the seconds of importing torch."""
    warm = WarmPipeline(tmp_path_factory.mktemp("warm-pipeline"))
    yield warm
    warm.close()
