"""The EOPD loss on Megatron vocab-parallel logits.

``vocab_parallel``: full-vocabulary primitives of one set of logits (stats, entropy, log-probs at ids,
top-k) and ``vocab_parallel_kl``: the KL pair of two, as autograd Functions with explicit TP collectives
and hand-written backward passes; ``vocab_shard``: the TP shard bookkeeping and the chunked statistics
pass they share.
``eopd``: :class:`EOPDConfig`, :class:`TeacherSignals`, :func:`teacher_signals`, :func:`eopd_loss`
(the paper's Eq. 7-10 plus the exact full-vocabulary mode).
"""

from megatron_eaopd.loss.eopd import METRIC_KEYS, EOPDConfig, TeacherSignals, eopd_loss, teacher_signals
from megatron_eaopd.loss.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
    vocab_parallel_log_softmax_stats,
    vocab_parallel_topk,
)
from megatron_eaopd.loss.vocab_parallel_kl import vocab_parallel_kl, vocab_parallel_kl_pair

__all__ = [
    "EOPDConfig",
    "TeacherSignals",
    "teacher_signals",
    "eopd_loss",
    "METRIC_KEYS",
    "vocab_parallel_log_softmax_stats",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
    "vocab_parallel_log_probs_and_entropy",
    "vocab_parallel_topk",
    "vocab_parallel_kl",
    "vocab_parallel_kl_pair",
]
