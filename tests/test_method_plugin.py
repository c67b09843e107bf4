"""A student method is a plug-in: a toy method written here (a learned bias on every decoder
layer's MLP output), installed the way a package installs one — an entry point of the group
``mimic_pipeline.methods`` — is trained, saved, reloaded and evaluated through the real CLI
without any file of the package knowing about it."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
from conftest import tiny
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

TOY = '''
import torch
from torch import nn

from pipeline.families.base import decoder_layers
from pipeline.methods import MethodSpec
from pipeline.methods.base import attach_output_hooks


class LayerBias(nn.Module):
    def __init__(self, layers, hidden):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(layers, hidden))


def build(config):
    return LayerBias(config.num_layers, config.hidden_size)


def attach(config, model):
    module = build(config)
    mlps = [layer.mlp for layer in decoder_layers(model)]
    return attach_output_hooks(model, module, mlps, lambda i, out: out + module.bias[i].to(out.dtype))


SPEC = MethodSpec(name="toy-bias", summary="a bias per layer", attach=attach, build=build, default_lr=0.05)
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "toy_method.py").write_text(TOY)
    info = site / "toy_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mimic_pipeline.methods]\ntoy-bias = toy_method:SPEC\n")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}


def _pipeline(warm, env, *args, cwd):
    """``python -m pipeline ARGS`` in a process of its own (forked by conftest's ``warm_pipeline`` from a server
    started with ``env``, the plugin's site on its path)."""
    res = warm.run(list(map(str, args)), env=env, cwd=cwd, timeout=300)
    assert res.returncode == 0, f"pipeline {' '.join(map(str, args))}:\n{res.stderr[-3000:]}"
    return res


def test_toy_method_trains_saves_loads_and_evaluates_through_the_cli(tmp_path, plugin_env, warm_pipeline):
    warm_pipeline.prestart(plugin_env, 1)  # the server imports torch while the model is saved
    pipeline = functools.partial(_pipeline, warm_pipeline)
    fam = tiny("llama")
    model = tmp_path / "model"
    fam.model.save_pretrained(model)
    fam.processor.save_pretrained(model)
    pipeline(plugin_env, "teacher-cache", "--task", "antonyms", "--model", model, "--shots", 2, "--n-queries", 6,
             "--out", tmp_path / "s.zarr", "--device", "cpu", cwd=tmp_path)
    train = ["train-student", "--cache", tmp_path / "s.zarr", "--method", "toy-bias", "--epochs", 2,
             "--device", "cpu", "--name", "toy"]
    pipeline(plugin_env, *train, cwd=tmp_path)
    run = tmp_path / "runs" / "toy"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["method"] == "toy-bias"
    tensors = load_file(str(run / "adapter.safetensors"))
    assert set(tensors) == {"bias"} and tuple(tensors["bias"].shape) == (2, fam.model.config.hidden_size)
    assert float(tensors["bias"].abs().max()) > 0, "the toy method did not train (its bias starts at zero)"
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] >= 0 and len(log) >= 2 and "align" in log[0]  # the default MSE alignment ran
    again = pipeline(plugin_env, *train, cwd=tmp_path)  # resume: loads its checkpoint through the registry
    assert "already trained" in again.stdout
    pipeline(plugin_env, "evaluate", "--runs", run, "--modes", "zero-shot", "--modes", "student", "--n-queries", 4,
             "--num-beams", 1, "--device", "cpu", cwd=tmp_path)
    result = json.loads((tmp_path / "results" / "antonyms" / "toy.json").read_text())
    assert result["mode"] == "student" and result["n"] == 4 and result["adapter"]["method"] == "toy-bias"
    assert "mean" in result["l2"], result["l2"]  # the L2 analysis ran the toy student and the base model
    assert result["l2"]["mean"]["student"] != result["l2"]["mean"]["zero-shot"]


def test_unknown_method_is_a_one_line_error_listing_the_methods(tmp_path, plugin_env, warm_pipeline):
    res = warm_pipeline.run(["train-student", "--cache", "x.zarr", "--method", "nope"], env=plugin_env, cwd=tmp_path,
                            timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown student method 'nope'" in res.stderr
    assert all(name in res.stderr for name in ("mimic", "live", "lora", "toy-bias"))
