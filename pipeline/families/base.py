"""What the pipeline needs to know about a model family, as data keyed by ``config.model_type``.

Contract used by prompts.py, attention.py and the stages:

- ``Segment``: one piece of an interleaved prompt: an optional image shown *before* its text.
- ``Encoded``: the token ids of one or more segments plus, per image, the processor's tensors.
  Encodings concatenate (``a + b``): a teacher sequence is ``bos + demo_1 + ... + demo_k + query``.
- ``Family``: per family, how to encode a segment with the family's processor (image placeholder
  tokens expanded exactly as the processor does), how to collate encodings into model inputs
  (padding side, attention mask, pixel tensors, Idefics1's image_attention_mask), the separator
  between rounds and the stop strings for generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class Segment:
    """One piece of an interleaved prompt. ``image`` (PIL image or None) is shown before ``text``."""

    text: str
    image: Any = None


@dataclass
class Encoded:
    """Token ids of a run of segments and the per-image processor tensors, in order of appearance.

    input_ids: token ids, no padding.
    images: one dict per image, e.g. ``{"pixel_values": (C, H, W)}`` or Idefics2's
        ``{"pixel_values": (n_crops, C, H, W), "pixel_attention_mask": (n_crops, H, W)}``; the family's
        ``collate`` knows how to stack them.
    """

    input_ids: list[int]
    images: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: Encoded) -> Encoded:
        return Encoded(self.input_ids + other.input_ids, self.images + other.images)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Geometry:
    """Shape of the language model's self-attention (read from the decoder layers and text config).

    num_layers: decoder layers (``len(model.get_decoder().layers)``).
    num_heads: query heads per layer.
    num_kv_heads: key/value heads per layer (``num_heads`` without GQA).
    head_dim: size of one head.
    hidden_size: the residual stream width.
    sliding_window: the attention window of sliding layers, None when every layer attends to all keys.
    sliding_layers: indices of the layers that use ``sliding_window``.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    sliding_window: int | None
    sliding_layers: tuple[int, ...] = ()


EncodeImage = Callable[["Family", Any, str, Any], Encoded]
"""(family, processor, text, image) -> the encoding of ``image`` followed by ``text``."""
CollateImages = Callable[..., dict[str, torch.Tensor]]  # (family, processor, batch, text, pin=False)
"""(family, processor, encodings, padded text tensors) -> the image tensors of the batch."""


@dataclass(frozen=True)
class Family:
    """A model family: data plus the two functions that differ between image layouts.

    name: human-readable name used in messages (``Idefics2``).
    model_types: every ``config.model_type`` this family serves.
    image_token: the placeholder token the processor repeats once per image feature; None: text only.
    image_prompt: what a prompt writes for one image before the processor expands it (Qwen-VL wraps
        ``<|image_pad|>`` in ``<|vision_start|>...<|vision_end|>``); defaults to ``image_token``.
    round_separator: text after each demonstration's answer and after the teacher-forced answer.
    stop_strings: generation stops at any of these (newline and next-round markers).
    lm_is_sub_config: the language model is a sub-config (``text_config``) of the model config.
    explicit_position_ids: collate passes ``position_ids = cumsum(mask) - 1``; False where the model
        computes its own (Qwen-VL's multimodal rope).
    start_tokens: tokens tried, in order, as BOS when the tokenizer has no ``bos_token``.
    required_tokens: tokens the tokenizer must know as single tokens (checked by ``check_processor``).
    encode_image: how one image + text segment becomes ids and per-image tensors.
    collate_images: how per-image tensors of a padded batch become model inputs.
    images_always: the model needs image inputs even for a text-only batch (Idefics1).
    """

    name: str
    model_types: tuple[str, ...]
    image_token: str | None
    image_prompt: str | None = None
    round_separator: str = "\n"
    stop_strings: tuple[str, ...] = ("\n", "Question:", "Caption:")
    lm_is_sub_config: bool = True
    explicit_position_ids: bool = True
    start_tokens: tuple[str, ...] = ()
    required_tokens: tuple[str, ...] = ()
    encode_image: EncodeImage | None = field(default=None, compare=False, repr=False)
    collate_images: CollateImages | None = field(default=None, compare=False, repr=False)
    images_always: bool = False

    @property
    def image_placeholder(self) -> str | None:
        """The text a prompt writes for one image (``image_prompt`` or ``image_token``)."""
        return self.image_prompt if self.image_prompt is not None else self.image_token

    def attn_implementation(self, name: str) -> str | dict[str, str]:
        """The ``attn_implementation`` argument that routes only the language model to ``name``.

        A dict ``{"text_config": name}`` where the language model is a sub-config (Idefics2/3, LLaVA*,
        Qwen-VL); the plain string otherwise (Idefics1 then also routes vision and cross-attention).
        """
        return {"text_config": name} if self.lm_is_sub_config else name

    def check_processor(self, processor: Any) -> None:
        """Raise ValueError unless the tokenizer knows every required token as one token."""
        tok = tokenizer_of(processor)
        missing = [t for t in self.required_tokens if token_id(tok, t) is None]
        if missing:
            raise ValueError(
                f"{self.name} tokenizer {type(tok).__name__} lacks the token(s) {missing}: they would be split "
                "into pieces (or map to <unk>). Load the family's own processor/tokenizer, which adds them."
            )

    def bos(self, processor: Any) -> Encoded:
        """The one start token both teacher and student sequences begin with (docs/architecture.md §4).

        The tokenizer's ``bos_token`` if it has one, else the first of ``start_tokens`` it knows.
        """
        tok = tokenizer_of(processor)
        if tok.bos_token_id is not None:
            return Encoded([int(tok.bos_token_id)])
        for candidate in self.start_tokens:
            found = token_id(tok, candidate)
            if found is not None:
                return Encoded([found])
        raise ValueError(
            f"{self.name}: the tokenizer has no bos_token and none of the family's start tokens "
            f"{list(self.start_tokens)}; set tokenizer.bos_token to the model's start token"
        )

    def encode(self, processor: Any, segment: Segment) -> Encoded:
        """Token ids of one segment (no special tokens added), its image expanded as the processor does."""
        if segment.image is None:
            ids = tokenizer_of(processor)(segment.text, add_special_tokens=False)["input_ids"]
            return Encoded(list(ids))
        if self.encode_image is None:
            raise ValueError(f"{self.name} is a text-only family; got a segment with an image: {segment.text!r}")
        return self.encode_image(self, processor, segment.text, segment.image)

    def collate(
        self, batch: Sequence[Encoded], processor: Any, padding_side: PaddingSide = "right", pin: bool = False,
        pad_to_multiple_of: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Pad encodings into model inputs for ``model(**batch)`` / ``model.generate(**batch)``.

        Returns input_ids (B, T), attention_mask (B, T), position_ids (B, T) = cumsum(mask) - 1 clamped
        at 0 when ``explicit_position_ids``, plus the family's image tensors when any sample has images.
        ``pin`` (CUDA): the image tensors are built in page-locked memory (``host_zeros``).
        ``pad_to_multiple_of``: T is the longest encoding rounded up to a multiple of it (as the tokenizers'
        option of that name), the extra columns padding like any other.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not batch:
            raise ValueError("cannot collate an empty batch")
        if not (isinstance(pad_to_multiple_of, int) and pad_to_multiple_of >= 1):
            raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}")
        ids = [torch.as_tensor(e.input_ids, dtype=torch.long) for e in batch]
        width = -(-max(len(t) for t in ids) // pad_to_multiple_of) * pad_to_multiple_of
        out = {
            "input_ids": pad_rows(ids, pad_token_id(processor), padding_side, width),
            "attention_mask": pad_rows([torch.ones_like(t) for t in ids], 0, padding_side, width),
        }
        if self.explicit_position_ids:
            out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if any(e.images for e in batch) or (self.images_always and self.collate_images is not None):
            if self.collate_images is None:
                raise ValueError(f"{self.name} is a text-only family; the batch carries images")
            out.update(self.collate_images(self, processor, batch, out, pin=pin))
        return out


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a processor (a text-only family's processor is its tokenizer)."""
    return getattr(processor, "tokenizer", processor)


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the tokenizer has it as one token (not ``<unk>``), else None."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(found)


def pad_token_id(processor: Any) -> int:
    """The pad id: the tokenizer's pad token, else its EOS, else 0 (padding is masked anyway)."""
    tok = tokenizer_of(processor)
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def host_zeros(shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A zeroed host tensor for a batch's images, page-locked when ``pin``.

    Why pinned at birth: a fresh pageable buffer per batch (an Idefics2 8-shot batch of 8: 205 MB of
    pixels and masks) is page-faulted in anew every batch, 0.65 s per batch on the benchmark VM, and
    then copied again into page-locked memory for an asynchronous host-to-device copy. torch's caching
    host allocator hands the same page-locked blocks out again once their copies are done: no faults,
    no second copy (``pin_batch`` keeps tensors that are already pinned)."""
    return torch.zeros(tuple(shape), dtype=dtype, pin_memory=pin)


def host_stack(tensors: Sequence[torch.Tensor], pin: bool) -> torch.Tensor:
    """``torch.stack`` into a ``host_zeros``-style buffer (page-locked when ``pin``)."""
    if not pin:
        return torch.stack(list(tensors))
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    return torch.stack(list(tensors), out=out)


def host_cat(tensors: Sequence[torch.Tensor], pin: bool) -> torch.Tensor:
    """``torch.cat`` along dim 0 into a page-locked buffer when ``pin``."""
    if not pin:
        return torch.cat(list(tensors))
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, pin_memory=True)
    return torch.cat(list(tensors), out=out)


def pad_rows(rows: Sequence[torch.Tensor], value: int | float, side: PaddingSide, width: int | None = None
             ) -> torch.Tensor:
    """Stack 1-D tensors (T_i,) into (B, width), filling with ``value`` on ``side``; ``width``: max T_i
    when None, else at least max T_i."""
    longest = max(len(r) for r in rows)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"pad_rows: width {width} is less than the longest row's {longest}")
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if len(r):
            if side == "left":
                out[i, width - len(r) :] = r
            else:
                out[i, : len(r)] = r
    return out


def real_positions(attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the column indices of real (unpadded) tokens of a (B, T) mask."""
    return [row.nonzero().squeeze(-1) for row in attention_mask]


def process_one(processor: Any, text: str, image: Any) -> Any:
    """Call the family's processor on one prompt with one image (no special tokens), tensors out."""
    return processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder layers: ``model.get_decoder().layers`` in every family.

    Works on ``*ForConditionalGeneration`` / ``*ForCausalLM`` and on the bare ``*Model`` alike (both
    resolve ``get_decoder`` to the language model; a plain LM's base model is its own decoder).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no decoder layers at model.get_decoder().layers; "
            "supported: HuggingFace causal LMs and image-text-to-text models of the families in pipeline.families"
        )
    return layers


def _layer_window(attn: torch.nn.Module, config: Any, index: int) -> int | None:
    if hasattr(attn, "sliding_window"):  # Qwen2-style modules decide per layer
        return attn.sliding_window
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)  # Mistral: one window for every layer


def attention_geometry(model: torch.nn.Module) -> Geometry:
    """The language model's attention shape, from its decoder layers' ``self_attn`` and text config."""
    layers = decoder_layers(model)
    config = model.config.get_text_config(decoder=True)
    attn = layers[0].self_attn
    num_heads = int(getattr(config, "num_attention_heads", None) or attn.num_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // num_heads)
    windows = [_layer_window(layer.self_attn, config, i) for i, layer in enumerate(layers)]
    sliding = tuple(i for i, w in enumerate(windows) if w is not None)
    return Geometry(
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        hidden_size=int(config.hidden_size),
        sliding_window=max((windows[i] for i in sliding), default=None),
        sliding_layers=sliding,
    )
