"""The EOPD loss on Megatron vocab-parallel logits.

``vocab_parallel``: full-vocabulary primitives (stats, entropy, log-probs at ids, top-k, KL) as
autograd Functions with explicit TP collectives and hand-written backward passes.
``eopd``: :class:`EOPDConfig`, :class:`TeacherSignals`, :func:`teacher_signals`, :func:`eopd_loss`
(the paper's Eq. 7-10 plus the exact full-vocabulary mode) and the metric reduction.
``gates``: the entropy gates. ``objective``: the objective object the trainer talks to.
"""

from megatron_eaopd.loss.eopd import (
    METRIC_DENOMINATORS,
    METRIC_KEYS,
    EOPDConfig,
    TeacherSignals,
    eopd_loss,
    eopd_loss_sums,
    reduce_metric_sums,
    teacher_signals,
)
from megatron_eaopd.loss.gates import GATES
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
