"""Defaults and provenance resolved in one place: option > what the artifacts record > the model's YAML >
the project default; artifacts that disagree are refused."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import CONFIGS_DIR, UserError
from pipeline.provenance import DEFAULT_EPOCHS, DEFAULT_SHOTS, default_epochs, model_defaults, resolve


def model_yaml(alias):
    return yaml.safe_load((CONFIGS_DIR / "models" / f"{alias}.yaml").read_text())


def test_option_beats_store_beats_model_yaml_beats_default():
    store = {"task_source": "plurals.yaml", "task": "plurals", "model": "idefics-9b", "shots": 4, "data_root": "/d"}
    got = resolve(records=[store])
    assert (got.task, got.model, got.shots, got.data_root) == ("plurals.yaml", "idefics-9b", 4, "/d")
    assert set(got.source.values()) == {"store"}
    got = resolve(task="antonyms", model="m", shots=2, data_root="/e", records=[store])
    assert (got.task, got.model, got.shots, got.data_root) == ("antonyms", "m", 2, "/e")
    assert set(got.source.values()) == {"option"}
    got = resolve(model="idefics-9b")  # no store: the model's YAML
    assert got.shots == model_yaml("idefics-9b")["shots"] and got.source["shots"] == "model defaults"
    got = resolve(model="some/hub-model")  # nothing anywhere: the project default
    assert (got.shots, got.source["shots"], got.task, got.source["task"]) == (DEFAULT_SHOTS, "default", None, "none")
    assert resolve(records=[{"shots": 0}]).shots == 0  # a 0-shot store is a value, not a missing one


def test_model_yaml_by_alias_or_hub_id():
    entry = model_yaml("idefics2-8b")
    assert model_defaults("idefics2-8b")["shots"] == entry["shots"]
    assert model_defaults(entry["id"])["epochs"] == entry["epochs"]
    assert default_epochs(entry["id"]) == entry["epochs"] and default_epochs("nope") == DEFAULT_EPOCHS


def test_records_that_disagree_are_refused_and_equal_ones_are_one():
    a = {"task": "plurals", "model": "m", "shots": 4}
    assert resolve(records=[a, dict(a)], what="the runs").shots == 4
    with pytest.raises(UserError, match=r"the runs were made with different shots values \(4, 8\); pass --shots"):
        resolve(records=[a, {**a, "shots": 8}], what="the runs")
    with pytest.raises(UserError, match=r"different task values \(plurals, antonyms\); pass --task"):
        resolve(records=[a, {**a, "task": "antonyms"}], what="the runs")
    assert resolve(shots=2, records=[a, {**a, "shots": 8}]).shots == 2  # an option settles it
