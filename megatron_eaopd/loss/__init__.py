"""The EOPD loss on Megatron vocab-parallel logits.

``vocab_parallel``: full-vocabulary primitives (stats, entropy, log-probs at ids, top-k, KL) as
autograd Functions with explicit TP collectives and hand-written backward passes (the passes in
``kernels``, the TP shard geometry and chunking in ``shards``).
``config``: :class:`EOPDConfig` (the settings; the ``loss:`` section of the recipes).
``signals``: :class:`TeacherSignals` and :func:`teacher_signals` (the teacher's per-token payload).
``eopd``: :func:`eopd_loss` / :func:`eopd_loss_sums` (the paper's Eq. 7-10, the exact full-vocabulary
mode and the variants: reverse-KL baseline, gates, quantile threshold).
``topk_kl``: forward and reverse KL on the teacher's top-k (three supports; the rest bucket).
``gates``: the entropy gates. ``quantile``: the exact global entropy quantile.
``metrics``: which sums the loss reports and how they reduce. ``objective``: what the trainer talks to.
"""

from megatron_eaopd.loss.config import EOPDConfig
from megatron_eaopd.loss.eopd import eopd_loss, eopd_loss_sums
from megatron_eaopd.loss.gates import GATES
from megatron_eaopd.loss.metrics import DERIVED_METRICS, METRIC_DENOMINATORS, METRIC_KEYS, reduce_metric_sums
from megatron_eaopd.loss.signals import TeacherSignals, teacher_signals
from megatron_eaopd.loss.objective import OBJECTIVES, EOPDObjective, Objective, build_objective
from megatron_eaopd.loss.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_kl_pair,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
    vocab_parallel_log_softmax_stats,
    vocab_parallel_topk,
)

__all__ = [
    "EOPDConfig",
    "TeacherSignals",
    "teacher_signals",
    "eopd_loss",
    "eopd_loss_sums",
    "reduce_metric_sums",
    "METRIC_KEYS",
    "METRIC_DENOMINATORS",
    "DERIVED_METRICS",
    "GATES",
    "Objective",
    "EOPDObjective",
    "OBJECTIVES",
    "build_objective",
    "vocab_parallel_log_softmax_stats",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
    "vocab_parallel_log_probs_and_entropy",
    "vocab_parallel_topk",
    "vocab_parallel_kl",
    "vocab_parallel_kl_pair",
]
