"""The EOPD objective (Jin et al., arXiv 2603.07079, Eq. 7-10) on vocab-parallel logits.

Per response token t (method.md, "The objective"):

* reverse-KL term, PPO-clipped sampled-token estimator (Eq. 7-8)::

      A_t = stopgrad(log pi_T(y_t) - log pi_old(y_t));  r_t = exp(log pi_theta(y_t) - log pi_old(y_t))
      l_rkl = max(-r_t A_t, -clip(r_t, 1 - eps, 1 + eps) A_t)

* forward-KL term over the teacher's top-k K_t (Eq. 10), against the student's FULL-vocabulary
  log-softmax at K_t; ``fkl_support`` picks the teacher distribution q_t on K_t:
  ``renormalize`` (softmax over K_t, the paper's majority reading), ``raw`` (teacher probabilities as
  they are) or ``tail`` (K_t plus one bucket holding the remaining mass on both sides: a true KL,
  never negative);
* per-token loss (Eq. 9): ``l_t = l_rkl + alpha * 1[H_T(t) > tau] * l_fkl``.

``mode="full"`` is this project's exact extension: ``l_t = KL(pi_theta||pi_T) + alpha * g_t *
KL(pi_T||pi_theta)`` over the whole vocabulary with analytic gradients (teacher logits needed on the
student's vocab shards). ``alpha = 0`` is the plain OPD baseline.

:func:`eopd_loss` follows Megatron's per-token-loss convention: it returns the SUM of per-token losses
over the loss mask and the number of tokens, so the global token mean (method.md step 4) is exact
however the global batch is split into micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch

from megatron_eaopd.loss.vocab_parallel import vocab_parallel_log_probs_and_entropy
from megatron_eaopd.loss.vocab_parallel_kl import vocab_parallel_kl_pair
from megatron_eaopd.loss.vocab_shard import as_rows, check_same_shards, make_shard, stats_forward

__all__ = ["EOPDConfig", "TeacherSignals", "teacher_signals", "eopd_loss", "METRIC_KEYS"]

_MODES = ("topk", "full")
#: Smallest student rest-of-vocabulary mass used by fkl_support="tail" (fp32 log-prob resolution).
_TAIL_FLOOR = 1e-9
_SUPPORTS = ("renormalize", "raw", "tail")

#: Keys of the metrics dict returned by :func:`eopd_loss` (token means unless noted).
METRIC_KEYS = (
    "rkl_term",  # mean l_rkl (topk: PPO-clipped sampled-token term; full: exact KL(student||teacher))
    "fkl_term",  # mean g_t * l_fkl over all valid tokens (before alpha)
    "gate_fraction",  # fraction of valid tokens with H_teacher > tau
    "teacher_entropy",  # mean full-vocabulary teacher entropy, nats
    "student_entropy",  # mean full-vocabulary student entropy, nats
    "fkl_gated",  # mean l_fkl over gated tokens only (0 if none)
    "log_ratio",  # mean log pi_theta(y_t) - log pi_old(y_t) (sampled token)
    "clip_fraction",  # fraction of valid tokens where the clipped branch is active (topk mode)
    "student_topk_mass",  # mean student probability mass on the teacher's top-k ids
    "teacher_student_log_ratio",  # mean log pi_T(y_t) - log pi_theta(y_t) (sampled-token RKL estimate, k1)
    "num_gated",  # count of gated valid tokens (a sum, for exact aggregation)
)


@dataclass(frozen=True)
class EOPDConfig:
    """Hyperparameters of the EOPD loss (method.md; paper values are the defaults).

    Attributes:
        mode: ``"topk"`` (the paper, Eq. 7-10) or ``"full"`` (exact full-vocabulary KLs).
        tau: teacher-entropy threshold in nats; the gate is ``H_T > tau`` (strict), paper 0.8.
        alpha: weight of the forward-KL term; 0 gives plain OPD. Paper 1.0.
        clip_eps: PPO clip range for the ratio in the reverse-KL term (topk mode). 0.2 (verl default).
        top_k: size of the teacher's top-k support K_t. Paper 16.
        fkl_support: ``"renormalize"``, ``"raw"`` or ``"tail"`` (see module docstring).
        temperature: both models' logits are divided by it before any softmax. Paper 1.0.
        vocab_size: the tokenizer's true vocabulary size; padded rows beyond it get zero probability.
    Raises:
        ValueError: on an unknown mode/support or an out-of-range number (message names the field).
    """

    mode: Literal["topk", "full"] = "topk"
    tau: float = 0.8
    alpha: float = 1.0
    clip_eps: float = 0.2
    top_k: int = 16
    fkl_support: Literal["renormalize", "raw", "tail"] = "renormalize"
    temperature: float = 1.0
    vocab_size: int | None = None

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"EOPDConfig.mode={self.mode!r} is not one of {list(_MODES)}")
        if self.fkl_support not in _SUPPORTS:
            raise ValueError(f"EOPDConfig.fkl_support={self.fkl_support!r} is not one of {list(_SUPPORTS)}")
        for name, lo in (("tau", 0.0), ("alpha", 0.0), ("clip_eps", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                raise ValueError(f"EOPDConfig.{name}={v!r} must be a finite number >= {lo}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"EOPDConfig.top_k={self.top_k!r} must be a positive integer")
        if not isinstance(self.temperature, (int, float)) or not (self.temperature > 0) or not math.isfinite(
            self.temperature
        ):
            raise ValueError(f"EOPDConfig.temperature={self.temperature!r} must be a positive finite number")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"EOPDConfig.vocab_size={self.vocab_size!r} must be a positive integer or None")
        if self.vocab_size is not None and self.top_k > self.vocab_size:
            raise ValueError(f"EOPDConfig.top_k={self.top_k} is larger than vocab_size={self.vocab_size}")


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
    """

    target_ids: torch.Tensor
    target_log_probs: torch.Tensor
    entropy: torch.Tensor
    topk_ids: torch.Tensor
    topk_log_probs: torch.Tensor
    logits: torch.Tensor | None = None

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
    sum p*z, logit at the target) and an all-gather of the local top-k per chunk.

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
    Source: method.md (H_t over the full vocabulary, K_t = teacher top-k); NeMo-RL distributed top-k.
    """
    if teacher_logits.dim() != 3 or target_ids.shape != teacher_logits.shape[:2]:
        raise ValueError(
            f"teacher_logits must be [B, S, V_local] and target_ids [B, S]; got {tuple(teacher_logits.shape)} "
            f"and {tuple(target_ids.shape)}"
        )
    sh = make_shard(teacher_logits, group, cfg.vocab_size, cfg.temperature, chunk_size, name="teacher_logits")
    true_v = cfg.vocab_size if cfg.vocab_size is not None else sh.v_local * sh.world
    if cfg.top_k > true_v:
        raise ValueError(f"EOPDConfig.top_k={cfg.top_k} is larger than the vocabulary ({true_v})")
    check_same_shards(sh, teacher_logits)
    _check_target(target_ids, true_v)
    with torch.no_grad():
        _, log_s, ent, gathered, (tv, ti), _ = stats_forward(
            sh, as_rows(teacher_logits), target_ids.reshape(-1, 1).long(), "teacher_logits", topk=cfg.top_k,
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
    )


def _check_target(target_ids: torch.Tensor, true_v: int) -> None:
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target_ids must be int64, got {target_ids.dtype}")
    if target_ids.numel() and (bool((target_ids < 0).any()) or bool((target_ids >= true_v).any())):
        raise ValueError(
            f"target_ids must lie in [0, vocab_size={true_v}); got values in "
            f"[{int(target_ids.min())}, {int(target_ids.max())}]. Replace padding ids with a valid id "
            f"(e.g. 0) and exclude those positions through loss_mask"
        )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -log 2 (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _topk_forward_kl(t_lp: torch.Tensor, s_lp: torch.Tensor, support: str) -> torch.Tensor:
    """Forward KL of the teacher against the student on the teacher's top-k (float64, per token).

    Args:
        t_lp: ``[N, k]`` teacher log-probs at K_t (full-vocab normalised).
        s_lp: ``[N, k]`` student full-vocab log-probs at K_t (differentiable).
        support: ``renormalize`` | ``raw`` | ``tail``.
    Returns:
        ``[N]`` float64 l_fkl (Eq. 10). ``tail`` is computed as sum_i q_i (e^d_i - 1 - d_i) with
        d_i = log p_i - log q_i over the K+1 buckets, each term >= 0 in floating point, so it is never
        negative (prior_art.md B1: truncated sums go negative and get clamped elsewhere).
    """
    t = t_lp.double()
    s = s_lp.double()
    if support in ("renormalize", "raw"):
        lq = torch.log_softmax(t, dim=-1) if support == "renormalize" else t
        finite = torch.isfinite(lq)  # -inf teacher entries have q = 0 and contribute exactly 0 (no 0 * inf)
        return torch.where(finite, lq.exp() * (torch.where(finite, lq, 0.0) - s), 0.0).sum(-1)
    # tail: the top-k entries the teacher gives mass to, plus one bucket with the rest of the mass of each
    # distribution (top-k slots with zero teacher probability belong to the rest). The student's rest
    # mass 1 - sum p is floored at _TAIL_FLOOR: below that it is fp32 rounding noise of the log-probs.
    valid = torch.isfinite(t)
    s_in = torch.where(valid, s, float("-inf"))
    lq_rest = _log1mexp(torch.logsumexp(t, dim=-1, keepdim=True))
    lp_rest = _log1mexp(torch.logsumexp(s_in, dim=-1, keepdim=True)).clamp(min=math.log(_TAIL_FLOOR))
    lq = torch.cat([torch.where(valid, t, 0.0), lq_rest], dim=-1)
    lp = torch.cat([torch.where(valid, s, 0.0), lp_rest], dim=-1)
    keep = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    q_pos = keep & torch.isfinite(lq)
    d = torch.where(q_pos, lp - lq, 0.0)
    # each term >= 0: q (e^d - 1 - d) where q > 0; where q = 0 (only the rest bucket) the KL charges p
    term = torch.where(q_pos, lq.exp() * (torch.expm1(d) - d), torch.where(keep, lp.exp(), 0.0))
    return term.sum(-1)


def _masked_mean(x: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (x.detach().float() * m).sum() / n.clamp(min=1)


def eopd_loss(
    student_logits: torch.Tensor, sig: TeacherSignals, old_log_probs: torch.Tensor, loss_mask: torch.Tensor,
    cfg: EOPDConfig, *, group=None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """EOPD loss (Eq. 9) of one micro-batch, in Megatron's per-token-loss convention.

    Args:
        student_logits: ``[B, S, V_local]`` vocab-parallel student logits (requires grad; any float dtype).
        sig: :class:`TeacherSignals` for the same ``[B, S]`` rows (``sig.logits`` needed for mode="full").
        old_log_probs: ``[B, S]`` fp32 ``log pi_old(y_t)`` of the rollout policy (recomputed by the trainer).
        loss_mask: ``[B, S]`` 0/1 (bool or float): response tokens that count.
        cfg: :class:`EOPDConfig`.
        group: tensor-parallel group (default: Megatron's).
    Returns:
        ``(loss_sum, num_tokens, metrics)``: ``loss_sum`` is a 0-dim fp32 tensor
        ``sum_t m_t l_t`` (nats; differentiable w.r.t. ``student_logits``), ``num_tokens`` the 0-dim
        int64 count ``sum_t m_t``; divide the sum over all micro-batches and DP ranks by the total
        token count for the paper's token mean (method.md step 4). ``metrics`` maps each of
        :data:`METRIC_KEYS` to a detached 0-dim fp32 tensor: token means over this call's valid tokens
        (0 when there are none), except ``num_gated`` (a count). Aggregate across micro-batches with
        ``num_tokens`` as weights (``fkl_gated`` with ``num_gated``).
    Raises:
        ValueError: mismatched shapes or vocab shards, unknown options, k > vocabulary, NaN in the inputs
        (the message names the tensor and the position), a TP group that does not divide the vocabulary.
    Source: Jin et al. 2026, Eq. 7-10; method.md "The objective" and "Exact full-vocabulary mode".
    """
    if not isinstance(cfg, EOPDConfig):
        raise ValueError(f"cfg must be an EOPDConfig, got {type(cfg).__name__}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, S, V_local], got shape {tuple(student_logits.shape)}")
    bs = tuple(student_logits.shape[:2])
    for name, t in (("old_log_probs", old_log_probs), ("loss_mask", loss_mask), ("sig.target_ids", sig.target_ids),
                    ("sig.target_log_probs", sig.target_log_probs), ("sig.entropy", sig.entropy)):
        if tuple(t.shape) != bs:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, S] = {bs} like student_logits")
    k = sig.topk_ids.shape[-1]
    if tuple(sig.topk_ids.shape) != (*bs, k) or tuple(sig.topk_log_probs.shape) != (*bs, k):
        raise ValueError(
            f"sig.topk_ids {tuple(sig.topk_ids.shape)} / sig.topk_log_probs {tuple(sig.topk_log_probs.shape)} "
            f"must be [B, S, k] with [B, S] = {bs}"
        )
    if k != cfg.top_k:
        raise ValueError(f"sig carries top-{k} teacher ids but EOPDConfig.top_k={cfg.top_k}; recompute teacher_signals")
    mask = loss_mask.to(torch.float32)
    valid = mask > 0
    _check_finite("old_log_probs", old_log_probs, valid, allow_inf=False)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("loss_mask must hold 0/1 values (bool or float); weighted masks would break the token mean")
    _check_finite("sig.target_log_probs", sig.target_log_probs, valid)
    _check_finite("sig.entropy", sig.entropy, valid)
    _check_finite("sig.topk_log_probs", sig.topk_log_probs, valid.unsqueeze(-1))

    ids = torch.cat([sig.target_ids.unsqueeze(-1).long(), sig.topk_ids.long()], dim=-1)  # [B, S, 1 + k]
    kw = dict(group=group, vocab_size=cfg.vocab_size, temperature=cfg.temperature, chunk_size=chunk_size)
    # masked positions get neutral values so that no inf/NaN enters the graph (0 * inf = NaN in backward)
    old = torch.where(valid, old_log_probs.float(), torch.zeros((), device=mask.device))
    t_lp_target = torch.where(valid, sig.target_log_probs.float(), torch.zeros((), device=mask.device))
    gate = ((sig.entropy > cfg.tau) & valid).float()

    if cfg.mode == "topk":
        s_lp, s_ent = vocab_parallel_log_probs_and_entropy(student_logits, ids, **kw)
        s_ent = s_ent.detach()
        lp = torch.where(valid, s_lp[..., 0], torch.zeros((), device=mask.device))
        adv = (t_lp_target - old).detach()
        ratio = torch.exp(lp - old)
        unclipped = -ratio * adv
        clipped = -ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
        l_rkl = torch.maximum(unclipped, clipped)
        clip_frac_tok = (clipped > unclipped).float()
        t_topk = torch.where(valid.unsqueeze(-1), sig.topk_log_probs.float(), torch.zeros((), device=mask.device))
        s_topk = torch.where(valid.unsqueeze(-1), s_lp[..., 1:], torch.zeros((), device=mask.device))
        if cfg.alpha > 0:
            l_fkl = _topk_forward_kl(t_topk.reshape(-1, k), s_topk.reshape(-1, k), cfg.fkl_support).view(bs).float()
        else:
            with torch.no_grad():
                l_fkl = _topk_forward_kl(t_topk.reshape(-1, k), s_topk.reshape(-1, k), cfg.fkl_support).view(bs).float()
        s_lp_ids = s_lp.detach()
    else:
        if sig.logits is None:
            raise ValueError(
                "EOPDConfig.mode='full' needs the teacher logits on the student's vocab shards: compute the "
                "signals with teacher_signals(..., keep_logits=True) from a teacher in the student's TP layout"
            )
        if sig.logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(sig.logits.shape)} and student logits {tuple(student_logits.shape)} must "
                f"have the same shape (same micro-batch, same vocab shards)"
            )
        l_rkl, l_fkl, s_ent, s_lp_ids = vocab_parallel_kl_pair(student_logits, sig.logits.detach(), ids, **kw)
        s_ent = s_ent.detach()
        lp = torch.where(valid, s_lp_ids[..., 0], torch.zeros((), device=mask.device))
        clip_frac_tok = torch.zeros_like(mask)

    per_token = l_rkl + cfg.alpha * gate * l_fkl
    per_token = torch.where(valid, per_token, torch.zeros((), device=mask.device))
    loss_sum = (per_token * mask).sum()
    num_tokens = valid.sum()
    n = num_tokens.float()
    n_gated = gate.sum()
    with torch.no_grad():
        metrics = {
            "rkl_term": _masked_mean(l_rkl, mask, n),
            "fkl_term": _masked_mean(gate * l_fkl, mask, n),
            "gate_fraction": _masked_mean(gate, mask, n),
            "teacher_entropy": _masked_mean(torch.where(valid, sig.entropy.float(), 0.0), mask, n),
            "student_entropy": _masked_mean(torch.where(valid, s_ent, 0.0), mask, n),
            "fkl_gated": (torch.where(valid, l_fkl.detach(), 0.0) * gate).sum() / n_gated.clamp(min=1),
            "log_ratio": _masked_mean(lp - old, mask, n),
            "clip_fraction": _masked_mean(clip_frac_tok, mask, n),
            # empty top-k slots (a teacher with fewer than k finite logits: -inf, id 0) hold no mass
            "student_topk_mass": _masked_mean(
                torch.where(valid, torch.where(torch.isfinite(sig.topk_log_probs), s_lp_ids[..., 1:].exp(), 0.0).sum(-1),
                            0.0), mask, n),
            "teacher_student_log_ratio": _masked_mean(t_lp_target - lp, mask, n),
            "num_gated": n_gated.detach(),
        }
    return loss_sum, num_tokens, metrics


def _check_finite(name: str, t: torch.Tensor, valid: torch.Tensor, allow_inf: bool = True) -> None:
    """Raise if ``t`` holds NaN (or, with ``allow_inf=False``, +-inf) where ``valid`` (broadcast) is true.

    -inf log-probs are allowed by default (zero probability)."""
    bad = (torch.isnan(t) if allow_inf else ~torch.isfinite(t)) & valid
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        what = "NaN" if allow_inf else "NaN or inf"
        raise ValueError(f"{name} contains {what} at a valid (loss_mask=1) position {idx} ({int(bad.sum())} in total)")
