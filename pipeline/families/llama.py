"""Llama-like text-only causal LMs (Llama, SmolLM2, Mistral, Qwen2/3, Phi-3): no images.

When the tokenizer has no ``bos_token`` the start token is ``<|im_start|>`` (SmolLM2's, id 1; docs/architecture.md §4;
also present in Qwen chat tokenizers), else ``<|endoftext|>`` (Qwen2's config ``bos_token_id``).
"""

from __future__ import annotations

from .base import Family

LLAMA = Family(
    name="Llama-like LM",
    model_types=("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3"),
    image_token=None,
    round_separator="\n",
    lm_is_sub_config=False,
    start_tokens=("<|im_start|>", "<|endoftext|>"),
)
