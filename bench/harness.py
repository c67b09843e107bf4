"""What every benchmark shares: full-size random models from pipeline/configs/models, offline processors,
timers, the bf16 matmul ceiling, FLOP counts and the machine description.

Models are built from the real architecture (``pipeline/configs/models/<alias>.yaml``) with random bf16
weights directly on the device; processors are built in-process (a byte-level BPE tokenizer trained
here on the shapes task's text, with the family's image tokens; Idefics2: PIL image processor, no
image splitting, 378 px -> 64 tokens per image; Idefics1: 224 px). ``--tiny`` swaps in the 2-layer
models of tests/tiny_models.py so every script can be smoke-tested on a CPU.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILY_TOKENS = {
    "idefics2": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
    "idefics": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
}
IDEFICS2_IMAGE_PX = 378  # no splitting: 27 x 27 patches of 14 px -> 64 perceiver tokens
IDEFICS_IMAGE_PX = 224


# ---- models and processors --------------------------------------------------------------------
def task_corpus(n: int = 400) -> list[str]:
    """Text of the shapes VQA task (questions, answers, templates) to train the tokenizer on."""
    from pipeline.tasks import load_task

    task = load_task("shapes_vqa", train_size=n, support_size=n, eval_size=n)
    lines = []
    for split in ("train", "support"):
        for ex in task.split(split):
            lines.append(task.spec.prompt.format(question=ex.question) + task.spec.answer.format(answer=ex.answers[0]))
    return lines


def build_tokenizer(extra_tokens: list[str], vocab_size: int = 2000) -> Any:
    """Byte-level BPE trained in-process on the task text, so words are about one token each
    (as with the real 32k tokenizers); BOS <s>, EOS </s>, pad <pad>; ``extra_tokens`` special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(task_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return fast


def _first_class(*names: str) -> Any:
    import transformers

    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ImportError(f"transformers {transformers.__version__} has none of {names}")


def build_processor(model_type: str) -> Any:
    tok = build_tokenizer(FAMILY_TOKENS[model_type])
    if model_type == "idefics2":
        from transformers import Idefics2Processor

        cls = _first_class("Idefics2ImageProcessorPil", "Idefics2ImageProcessor")
        ip = cls(do_image_splitting=False, size={"shortest_edge": IDEFICS2_IMAGE_PX, "longest_edge": IDEFICS2_IMAGE_PX})
        return Idefics2Processor(ip, tok, image_seq_len=64)
    if model_type == "idefics":
        from transformers import IdeficsProcessor

        cls = _first_class("IdeficsImageProcessorPil", "IdeficsImageProcessor")
        return IdeficsProcessor(cls(image_size=IDEFICS_IMAGE_PX), tok)
    raise ValueError(f"no benchmark processor for model_type {model_type!r}")


def model_yaml(alias: str) -> dict:
    return yaml.safe_load((ROOT / "pipeline" / "configs" / "models" / f"{alias}.yaml").read_text())


def build_model(alias: str, device: str = "cuda", tiny: bool = False) -> tuple[Any, Any]:
    """(model, processor): the full-size architecture of ``alias`` with random bf16 weights on
    ``device`` (or, ``tiny``, the 2-layer float32 test model of the same family)."""
    data = model_yaml(alias)
    model_type = data["model_type"]
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny

        model, processor = build_tiny(model_type)
        return model.to(device).requires_grad_(False), processor
    from transformers import AutoConfig, AutoModelForImageTextToText

    processor = build_processor(model_type)
    arch = dict(data["architecture"])
    tok = processor.tokenizer
    if model_type == "idefics2":
        arch["image_token_id"] = tok.convert_tokens_to_ids("<image>")
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if model_type == "idefics2":
        arch["text_config"] = {**arch["text_config"], **ids}
    else:
        arch.update(ids)
    config = AutoConfig.for_model(model_type, **arch)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)  # frozen, as in every stage
    if model_type == "idefics":  # zero-initialised gates would hide the images (compute is the same)
        with torch.no_grad():
            for layer in model.model.gated_cross_attn_layers:
                layer.alpha_cross_attn.fill_(0.5)
                layer.alpha_dense.fill_(0.5)
    return model, processor


def set_attention(model: Any, name: str) -> None:
    """Route the language model's attention to ``name`` ("sdpa" = stock, "mimic")."""
    from pipeline.attention import register_mimic_attention
    from pipeline.families import family_for

    register_mimic_attention()
    model.set_attn_implementation(family_for(model.config).attn_implementation(name))


# ---- timing ------------------------------------------------------------------------------------
def sync(device: Any = None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], warmup: int = 2, iters: int = 10) -> dict:
    """Median / min / spread of wall time per call in ms (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": iters}


def profiler(**kwargs: Any) -> Any:
    """``torch.profiler.profile`` over the CPU and, where there is one, the GPU."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts, **kwargs)


def profile_tables(prof: Any, rows: int = 30) -> dict[str, str]:
    """A finished profile's key averages: by CPU total (where the host time goes, the step's parts
    included) and by device self time (which kernels the GPU runs)."""
    ka = prof.key_averages()
    return {"by_cpu_total": ka.table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=60),
            "by_device_self": ka.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)}


def longest_events(prof: Any, rows: int = 60) -> list[tuple]:
    """The ``rows`` longest single host events of a finished profile: (name, thread, start s, ms), start counted
    from the profile's first event. One-time costs (a first allocation, a kernel module loaded, a plan built)
    hide inside the key averages' sums; here each shows on its own."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    if not events:
        return []
    t0 = min(e.time_range.start for e in events)
    events.sort(key=lambda e: e.time_range.elapsed_us(), reverse=True)
    return [(e.name[:80], e.thread, round((e.time_range.start - t0) / 1e6, 3), round(e.time_range.elapsed_us() / 1e3, 2))
            for e in events[:rows]]


def bench_kernel(fn: Callable[[], Any], warmup_ms: int = 50, rep_ms: int = 200) -> float:
    """Median ms of a short GPU call (triton's do_bench: CUDA events, L2 flushed between calls);
    a synchronised wall-clock median on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return time_fn(fn, 1, 5)["median_ms"]


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of an n x n x n product on random data: the MFU ceiling."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench_kernel(lambda: a @ b, 100, 1000)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---- FLOPs -------------------------------------------------------------------------------------
LATENTS = 64  # perceiver outputs per image (Idefics1 and Idefics2)


def _tokens_per_param(name: str, text: int, patches: int, images: int, logits: int) -> int:
    """How many tokens a parameter's matmul sees in one forward (see ``forward_flops``)."""
    if name.startswith("lm_head"):
        return logits
    if "vision_model" in name or "modality_projection" in name:
        return patches
    if "perceiver" in name:  # queries: the latents; keys/values: patches + latents
        return patches + LATENTS * images if ("k_proj" in name or "v_proj" in name) else LATENTS * images
    if "cross_attn.k_proj" in name or "cross_attn.v_proj" in name:  # Idefics1: keys are image latents
        return LATENTS * images
    if "embed_tokens" in name or name.endswith("latents") or "position_embedding" in name:
        return 0  # lookups, not matmuls
    return text


def image_tokens(model: Any) -> int:
    """Patch tokens the vision tower sees per image (Idefics2 378 px: 729; Idefics1 224 px: 257)."""
    if hasattr(model.model, "text_model"):
        return (IDEFICS2_IMAGE_PX // 14) ** 2
    return (IDEFICS_IMAGE_PX // 14) ** 2 + 1


def forward_flops(model: Any, text_tokens: int, images: int, logit_tokens: int) -> dict[str, float]:
    """2 * params * tokens, per parameter by the tokens its matmul sees: decoder layers (Idefics1:
    with the gated cross-attention's query/output/MLP) x real text tokens; lm_head x positions whose
    logits are computed; vision tower and modality projection x patches; perceiver queries/MLP x
    64 latents per image, its keys/values x (patches + latents); Idefics1 cross-attention keys/values
    x image latents. Attention score FLOPs (QK^T and PV) are not included."""
    patches = images * image_tokens(model)
    parts: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norms, biases, gates: no matmul
        part = ("lm_head" if name.startswith("lm_head") else "vision" if "vision_model" in name
                else "connector" if ("perceiver" in name or "connector" in name) else "text")
        tokens = _tokens_per_param(name, text_tokens, patches, images, logit_tokens)
        parts[part] = parts.get(part, 0.0) + 2.0 * p.numel() * tokens
    parts["total"] = sum(parts.values())
    return parts


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of every matmul / convolution / attention op one call of ``fn`` runs (torch's
    FlopCounterMode; attention counted as full, not causal); NaN where the counter cannot count
    (GQA attention in torch 2.11)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except AssertionError:  # torch 2.11's sdpa formula rejects GQA (fewer key heads than query heads)
        return float("nan")
    return float(counter.get_total_flops())


# ---- machine and output ------------------------------------------------------------------------
def machine() -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": __import__("os").cpu_count()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable ({e})"
    return info


class Report:
    """Figures with their comparisons: ``add(name, value, unit, ref=name_of_comparison)`` prints
    value and ratio; ``save(path)`` writes every figure as JSON."""

    def __init__(self, title: str):
        self.title, self.rows, self.extra = title, {}, {}

    def add(self, name: str, value: float, unit: str, ref: str | None = None, note: str = "") -> None:
        row = {"value": value, "unit": unit, "ref": ref, "note": note}
        if ref is not None and ref in self.rows and self.rows[ref]["value"]:
            row["ratio"] = value / self.rows[ref]["value"]
        self.rows[name] = row
        ratio = f"  ({row['ratio']:.3f}x {ref})" if "ratio" in row else ""
        print(f"[{self.title}] {name}: {value:.4g} {unit}{ratio}{'  ' + note if note else ''}", flush=True)

    def table(self) -> str:
        lines = [f"## {self.title}", "| figure | value | unit | vs | ratio |", "|---|---|---|---|---|"]
        for name, r in self.rows.items():
            ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
            lines.append(f"| {name} | {r['value']:.4g} | {r['unit']} | {r['ref'] or ''} | {ratio} |")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"title": self.title, "machine": machine(), "rows": self.rows,
                                          "extra": self.extra}, indent=2, default=str))
