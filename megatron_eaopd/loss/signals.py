"""What the frozen teacher contributes per token: :class:`TeacherSignals` and :func:`teacher_signals`.

One chunked pass over the teacher's vocab-parallel logits gives, per token, the target log-prob, the
full-vocabulary entropy and the global top-k (``O(B * S * k)`` numbers instead of ``B * S * V``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_eaopd.loss.config import EOPDConfig
from megatron_eaopd.loss.kernels import _stats_forward
from megatron_eaopd.loss.shards import _check_same_shards, _rows, _shard

__all__ = ["TeacherSignals", "teacher_signals", "check_target_ids"]


@dataclass
class TeacherSignals:
    """What the frozen teacher contributes per token; no tensor here carries gradient.

    Layout: ``[B, S]`` rows aligned with the student's logits (row ``[b, s]`` describes the prediction
    of ``target_ids[b, s]``, already shifted).

    Attributes:
        target_ids: ``[B, S]`` int64 sampled tokens y_t.
        target_log_probs: ``[B, S]`` fp32 ``log pi_T(y_t | s_t)`` (nats).
        entropy: ``[B, S]`` fp32 full-vocabulary teacher entropy H_t (nats).
        topk_ids: ``[B, S, k]`` int64 global ids of the teacher's top-k tokens.
        topk_log_probs: ``[B, S, k]`` fp32 teacher log-probs at ``topk_ids`` (full-vocab normalised).
        logits: ``[B, S, V_local]`` teacher logits on the student's vocab shards (``mode="full"`` only).
        rest_log_prob: ``[B, S]`` fp32 log of the teacher's probability mass outside ``topk_ids`` (nats;
            ``-inf`` when the top-k holds all of it), summed over those entries directly, so it stays
            accurate when the top-k holds nearly all the mass (the rest bucket of ``fkl_support="tail"``
            and of ``rkl_baseline="kl"``). None: derived from ``topk_log_probs`` (``log(1 - sum exp)``,
            whose fp32 rounding is ~1e-7 in absolute mass).
    """

    target_ids: torch.Tensor
    target_log_probs: torch.Tensor
    entropy: torch.Tensor
    topk_ids: torch.Tensor
    topk_log_probs: torch.Tensor
    logits: torch.Tensor | None = None
    rest_log_prob: torch.Tensor | None = None

    def to(self, device) -> "TeacherSignals":
        """Copy every tensor to ``device`` (e.g. to host memory between phases)."""
        return TeacherSignals(**{f.name: (None if (t := getattr(self, f.name)) is None else t.to(device))
                                 for f in fields(self)})

    def select(self, index) -> "TeacherSignals":
        """Rows ``index`` (slice or index tensor over the batch dimension) of every tensor."""
        return TeacherSignals(**{f.name: (None if (t := getattr(self, f.name)) is None else t[index])
                                 for f in fields(self)})


def teacher_signals(
    teacher_logits: torch.Tensor, target_ids: torch.Tensor, cfg: EOPDConfig, *, group=None,
    keep_logits: bool | None = None, chunk_size: int | None = None,
) -> TeacherSignals:
    """Teacher target log-prob, full-vocab entropy and global top-k from vocab-parallel logits (no grad).

    One chunked pass over the teacher logits: a MAX all-reduce, one SUM all-reduce of (sum exp,
    sum p*z, logit at the target, mass outside the top-k) and an all-gather of the local top-k per chunk.

    Args:
        teacher_logits: ``[B, S, V_local]`` (any float dtype), Megatron vocab-parallel layout.
        target_ids: ``[B, S]`` int64 global ids the logits at ``[b, s]`` predict.
        cfg: :class:`EOPDConfig` (temperature, top_k, vocab_size, mode).
        group: tensor-parallel group (default Megatron's).
        keep_logits: keep a reference to ``teacher_logits`` (default: ``cfg.mode == "full"``).
    Returns:
        :class:`TeacherSignals`.
    Raises:
        ValueError: shape mismatch, ids out of range, NaN/+inf logits (with location), k > vocab.
    Source: docs/method.md (H_t over the full vocabulary, K_t = teacher top-k); NeMo-RL distributed top-k.
    """
    if teacher_logits.dim() != 3 or target_ids.shape != teacher_logits.shape[:2]:
        raise ValueError(
            f"teacher_logits must be [B, S, V_local] and target_ids [B, S]; got {tuple(teacher_logits.shape)} "
            f"and {tuple(target_ids.shape)}"
        )
    sh = _shard(teacher_logits, group, cfg.vocab_size, cfg.temperature, chunk_size, name="teacher_logits")
    true_v = cfg.vocab_size if cfg.vocab_size is not None else sh.v_local * sh.world
    if cfg.top_k > true_v:
        raise ValueError(f"EOPDConfig.top_k={cfg.top_k} is larger than the vocabulary ({true_v})")
    _check_same_shards(sh, teacher_logits)
    check_target_ids(target_ids, true_v)
    with torch.no_grad():
        _, log_s, ent, gathered, (tv, ti, rest), _ = _stats_forward(
            sh, _rows(teacher_logits), target_ids.reshape(-1, 1).long(), "teacher_logits", topk=cfg.top_k,
            shape=tuple(teacher_logits.shape),
        )
    b, s = target_ids.shape
    keep = cfg.mode == "full" if keep_logits is None else keep_logits
    return TeacherSignals(
        target_ids=target_ids.long(),
        target_log_probs=(gathered[:, 0] - log_s).view(b, s),
        entropy=ent.view(b, s),
        topk_ids=ti.view(b, s, cfg.top_k),
        topk_log_probs=(tv - log_s.unsqueeze(1)).view(b, s, cfg.top_k),
        logits=teacher_logits.detach() if keep else None,
        rest_log_prob=rest.view(b, s),
    )


def check_target_ids(target_ids: torch.Tensor, true_v: int) -> None:
    """Raise ValueError unless ``target_ids`` are int64/int32 ids in ``[0, true_v)`` (names the range and the fix)."""
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids must be int64, got {target_ids.dtype}")
    if target_ids.numel() and (bool((target_ids < 0).any()) or bool((target_ids >= true_v).any())):
        raise ValueError(
            f"target_ids must lie in [0, vocab_size={true_v}); got values in "
            f"[{int(target_ids.min())}, {int(target_ids.max())}]. Replace padding ids with a valid id "
            f"(e.g. 0) and exclude those positions through loss_mask"
        )
