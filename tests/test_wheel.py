"""The wheel carries everything the tool needs: built offline from a copy of the sources, installed into a
fresh virtual environment, and run from another directory (built-in tasks and model aliases, the demo
VLM's shipped weights, `--help`, `--version`), with the conversion cache outside site-packages."""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pipeline", "stages")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, pipeline script, env) of a fresh venv holding only the wheel; its dependencies are the
    running environment's, seen through a .pth file (whose own .pth files, the editable install's finder
    among them, are not run: the package imported is the wheel's)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: the wheel cannot be built offline (--no-build-isolation)")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building never writes build/ or *.egg-info into the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = root / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(dist)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("mimic_pipeline-*.whl"))

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_path("purelib")} if Path(p).is_dir()]
    (purelib / "_outer_site_packages.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MIMIC_CACHE", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", XDG_CACHE_HOME=str(root / "xdg-cache"))
    return python, env_dir / "bin" / "pipeline", env, purelib


def run(*cmd, cwd, env):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stderr[-3000:]}"
    return res.stdout


def test_the_installed_wheel_runs_from_another_directory(installed, tmp_path):
    python, script, env, purelib = installed
    from pipeline import __version__

    assert run(script, "--version", cwd=tmp_path, env=env).strip() == f"mimic-pipeline {__version__}"
    for command in ("teacher-cache", "train-student", "evaluate", "inspect", "demo"):
        out = run(script, command, "--help", cwd=tmp_path, env=env)
        assert "Usage" in out and "--config" in out
    assert "vqav2" in run(script, "teacher-cache", "--help", cwd=tmp_path, env=env)
    probe = (
        "import pipeline, pipeline.demo_vlm as d\n"
        "from pipeline.tasks import task_names\n"
        "from pipeline.provenance import default_shots\n"
        "from pipeline.models import cache_root\n"
        "print(pipeline.__file__); print(' '.join(task_names())); print(default_shots('idefics2-8b'))\n"
        "print((d.SHIPPED_DIR / 'vision_projector.safetensors').is_file()); print(cache_root())\n"
    )
    where, tasks, shots, shipped, cache = run(python, "-c", probe, cwd=tmp_path, env=env).splitlines()
    assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not the checkout
    assert {"vqav2", "okvqa", "coco_caption", "plurals", "shapes_group_vqa"} <= set(tasks.split())
    assert (shots, shipped) == ("8", "True")
    # converted models go to the user's cache, never into site-packages
    assert Path(cache) == Path(env["XDG_CACHE_HOME"]) / "mimic-pipeline"
    assert not list(tmp_path.iterdir())  # nothing written into the working directory
