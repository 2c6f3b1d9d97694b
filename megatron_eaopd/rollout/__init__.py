"""Student rollouts: sampling settings, the rollout batch, stop ids, and the engines behind one interface.

* :mod:`.params` - :class:`RolloutParams` (what a call samples), :class:`RolloutConfig` (the ``rollout``
  section: sampling + engine settings), :func:`sampling_seed`;
* :mod:`.batch` - :class:`RolloutBatch` and :func:`assemble_batch`;
* :mod:`.stops` - :func:`stop_token_ids` (every id that ends a response);
* :mod:`.engine` - the :class:`RolloutEngine` interface and what every engine shares;
* :mod:`.static`, :mod:`.dynamic`, :mod:`.recompute` - the engines; :mod:`.factory` - :func:`make_engine`.

The engine modules import megatron-core's inference stack; import them (or :mod:`.factory`) where
an engine is built, so that reading a configuration stays light.
"""

from megatron_eaopd.rollout.batch import RolloutBatch, assemble_batch
from megatron_eaopd.rollout.params import EngineKind, RolloutConfig, RolloutParams, sampling_seed
from megatron_eaopd.rollout.stops import chat_end_of_turn_ids, stop_token_ids

__all__ = ["RolloutParams", "RolloutConfig", "EngineKind", "sampling_seed", "RolloutBatch", "assemble_batch",
           "stop_token_ids", "chat_end_of_turn_ids"]
