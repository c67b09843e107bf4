"""Training losses of the students, pure torch: L = L_align + lambda * L_gt (paper Eq. 9).

Shapes: B samples, S aligned positions (right-padded, ``mask`` marks real ones), L layers,
D hidden size, V vocabulary, K stored top-k teacher log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def align_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """student, teacher (B, S, L, D); mask (B, S) bool. Per-sample mean over its real positions x L x D,
    then the batch mean. Returns a scalar (float32)."""
    diff = (student.float() - teacher.float()).pow(2) * mask[..., None, None]
    per_elem = diff.shape[2] * diff.shape[3]
    per_sample = diff.sum(dim=(1, 2, 3)) / (mask.sum(1).clamp_min(1) * per_elem)
    return per_sample.mean()


def align_l2sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """student, teacher (B, S, L, D); mask (B, S). Sum over L and D of the squared difference,
    mean over real tokens of each sample, then over the batch. Returns a scalar."""
    per_token = (student.float() - teacher.float()).pow(2).sum(dim=(2, 3)) * mask
    return (per_token.sum(1) / mask.sum(1).clamp_min(1)).mean()


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) at positions (B, S) long -> (B, S, V)."""
    return torch.gather(logits, 1, positions[..., None].expand(-1, -1, logits.shape[-1]))


def answer_ce(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the tokens marked by ``target_mask`` given their prefix.

    logits (B, T, V); input_ids (B, T); target_mask (B, T) bool, never true at position 0.
    Mean over all marked tokens of the batch. Returns a scalar (float32).
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(~target_mask[:, 1:], -100)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


def kl_topk(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """KL(teacher || student) restricted to the teacher's top-k tokens, renormalised on both sides.

    student_logits (B, S, V) — the student's logits at the positions the teacher's were kept at
    (each predicts the next token); teacher_values (B, S, K)
    log-probs and teacher_indices (B, S, K); mask (B, S). Mean over marked positions.
    """
    t_logp = torch.log_softmax(teacher_values.float(), -1)
    s_logp = torch.log_softmax(torch.gather(student_logits.float(), -1, teacher_indices), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)
