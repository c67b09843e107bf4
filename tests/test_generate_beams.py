"""Beam search over prompts with several images: every beam must read its own prompt's images.

transformers 5.17's ``generate`` expanded a flat ``pixel_values`` (LLaVA: ``(images, C, H, W)``) for the
beams image by image, so a prompt's beams read a demonstration's image where the query's belongs; the
demo VLM's 3-beam 8-shot ICL scored 16.67 there against 58.33 with 5.24 on the same prompts.
``pipeline.forward.check_beam_images`` refuses that case; these tests check (1) that with the installed
transformers the first beam step of a two-prompt, three-images-each batch scores exactly what a direct
forward of each prompt alone gives, and (2) that the refusal fires where, and only where, the old
expansion would be wrong.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from pipeline.config import UserError
from pipeline.forward import check_beam_images, generate_batch, generation_inputs
from pipeline.prompts import build_prompt
from pipeline.runtime import wrap_model
from pipeline.tasks import load_task


def image_prompts(loaded, shots: int, n: int = 2):
    task = load_task("shapes_group_vqa")
    support, queries = task.split("support"), task.split("eval")
    prompts = []
    for i in range(n):
        demos = [support[shots * i + j] for j in range(shots)]
        prompts.append(build_prompt(loaded.family, loaded.processor, task.spec, queries[i], demos,
                                    [task.demo_answer(d) for d in demos], None))
    return prompts


def last_log_probs(loaded, prompt) -> torch.Tensor:
    batch = generation_inputs(loaded, [prompt])
    with torch.inference_mode():
        return torch.log_softmax(loaded.model(**batch).logits[0, -1].double(), -1)


@pytest.mark.parametrize("name", ["llava", "idefics2"])
def test_first_beam_step_reads_each_prompts_own_images(name):
    fam = tiny(name)
    loaded = wrap_model(fam.model, fam.processor, f"tiny-{name}")
    prompts = image_prompts(loaded, shots=2)
    assert all(len(p.encoded.images) == 3 for p in prompts)
    alone = [last_log_probs(loaded, p) for p in prompts]
    # the images matter: the same text with the two prompts' images swapped scores differently
    a, b = prompts
    crossed = type(a.encoded)(a.encoded.input_ids, b.encoded.images)
    batch = loaded.family.collate([crossed], loaded.processor, "left")
    batch.pop("position_ids", None)
    with torch.inference_mode():
        crossed_lp = torch.log_softmax(loaded.model(**batch).logits[0, -1].double(), -1)
    assert (crossed_lp - alone[0]).abs().max() > 1e-4
    beams = 3
    batch = generation_inputs(loaded, prompts)
    check_beam_images(loaded.model, batch, prompts, beams)  # the installed transformers expands correctly
    with torch.inference_mode():
        out = loaded.model.generate(**batch, max_new_tokens=1, num_beams=beams, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True,
                                    pad_token_id=loaded.processor.tokenizer.pad_token_id)
    first = out.scores[0].double().view(len(prompts), beams, -1)
    for i, ref in enumerate(alone):
        for k in range(beams):  # every beam of prompt i starts from prompt i's own distribution
            assert torch.allclose(first[i, k], ref, atol=1e-4), (i, k, (first[i, k] - ref).abs().max())


def test_refusal_where_the_old_expansion_is_wrong(monkeypatch):
    import pipeline.forward as forward

    fam = tiny("llava")
    loaded = wrap_model(fam.model, fam.processor, "tiny-llava")
    several = image_prompts(loaded, shots=2)
    single = image_prompts(loaded, shots=0)
    assert forward.generate_expands_images()  # the locked version has the fix
    monkeypatch.setattr(forward, "generate_expands_images", lambda: False)  # as transformers 5.17
    with pytest.raises(UserError, match="--num-beams 1"):
        generate_batch(loaded, several, 2, 3)
    assert len(generate_batch(loaded, several, 2, 1)) == 2  # greedy expands nothing
    assert len(generate_batch(loaded, single, 2, 3)) == 2  # one image per prompt: dim 0 is the prompt
    idefics2 = tiny("idefics2")  # (batch, images, C, H, W): dim 0 is the prompt whatever the images
    loaded2 = wrap_model(idefics2.model, idefics2.processor, "tiny-idefics2")
    prompts2 = image_prompts(loaded2, shots=2)
    check_beam_images(loaded2.model, generation_inputs(loaded2, prompts2), prompts2, 3)
