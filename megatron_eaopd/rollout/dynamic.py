"""The dynamic engine: megatron-core's ``DynamicInferenceEngine`` (continuous batching, paged KV cache). GPU only.

Needs CUDA and a flash-attn its dynamic batching accepts (>= 2.7.3, FA3 or FA4; see
:func:`megatron_eaopd.models.backend.flash_attn_available`); :func:`~megatron_eaopd.rollout.factory.make_engine`
falls back to the static engine with a warning otherwise. TP >= 1, PP = 1.

* **Stops.** A request carries one ``termination_id``; the other stop ids are given as one-token
  stop words kept in the output (``detokenize_stop_sequence=True``), so a response ends with the stop
  token it sampled, with its log-prob.
* **KV cache between rollouts.** The context is built with ``KVCacheManagementMode.RECOMPUTE``:
  :meth:`DynamicEngine.release` (called by the trainer after every rollout) suspends the engine, which
  frees the KV buffer (``rollout.kv_buffer_gb``) for teacher scoring and training; the next
  ``generate`` resumes it. A larger batch or longer sequence frees the old engine before building
  the new one.
* **max_requests** is rounded up to a multiple of TP (megatron-core asserts it divides).
* No CUDA graphs: the weights change between rollouts.
"""

from __future__ import annotations

import gc
from typing import Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.config import InferenceConfig, KVCacheManagementMode
from megatron.core.inference.contexts import DynamicInferenceContext
from megatron.core.inference.engines import DynamicInferenceEngine
from megatron.core.inference.inference_request import Status
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController

from megatron_eaopd.pipeline import padded_length
from megatron_eaopd.rollout.engine import EngineBase, MegatronTokenizer
from megatron_eaopd.rollout.params import RolloutParams
from megatron_eaopd.rollout.static import megatron_sampling_params

__all__ = ["DynamicEngine", "dynamic_max_requests"]


def dynamic_max_requests(rows: int, tp: int) -> int:
    """Request slots of the dynamic context: ``rows`` rounded up to a multiple of ``tp``
    (``DynamicInferenceContext`` asserts ``max_requests % tp == 0``)."""
    return padded_length(max(int(rows), 1), max(int(tp), 1))


class DynamicEngine(EngineBase):
    """megatron-core's dynamic engine behind :class:`~megatron_eaopd.rollout.engine.RolloutEngine`.

    Args:
        model_chunks, tokenizer, stop_ids, max_batch_size, progress: see
            :class:`~megatron_eaopd.rollout.engine.EngineBase`.
        kv_buffer_gb: KV-cache buffer per GPU (GiB).
    Raises:
        ValueError: the model is pipeline-parallel; a stop id that does not round-trip through the
            tokenizer as one token (the engine matches stop words by re-tokenising them).
    """

    kind = "dynamic"

    def __init__(self, model_chunks: list, tokenizer, stop_ids: Sequence[int], *, kv_buffer_gb: float = 20.0, **kwargs):
        super().__init__(model_chunks, tokenizer, stop_ids, **kwargs)
        if self.model.config.pipeline_model_parallel_size > 1:
            raise ValueError("the dynamic engine supports pipeline_model_parallel_size == 1 only")
        self.kv_buffer_gb = kv_buffer_gb
        self._tok = MegatronTokenizer(tokenizer, self.stop_ids[0])
        self._stop_words = []
        for i in self.stop_ids[1:]:
            word = tokenizer.decode([i], skip_special_tokens=False)
            if self._tok.tokenize(word) != [i]:
                raise ValueError(f"stop id {i} ({word!r}) does not re-tokenise to itself; the dynamic engine cannot "
                                 f"match it as a stop word (use rollout.engine=static)")
            self._stop_words.append(word)
        self._built = None  # (engine, controller, max_requests, max_seq)

    def _engine(self, max_requests: int, max_seq: int):
        b = self._built
        if b is not None and b[2] >= max_requests and b[3] >= max_seq:
            b[0].resume()
            return b[0], b[1]
        if b is not None:  # free the old KV buffer before the new one is allocated
            b[0].suspend()
            self._built = b = None
            gc.collect()
            torch.cuda.empty_cache()
        context = DynamicInferenceContext(
            model_config=self.model.config,
            inference_config=InferenceConfig(
                max_sequence_length=max_seq, buffer_size_gb=self.kv_buffer_gb, max_requests=max_requests,
                num_cuda_graphs=None, unified_memory_level=0, materialize_only_last_token_logits=True,
                logprobs_mode="raw_logprobs", offset_sampling_seed_by_dp_rank=False,
                kv_cache_management_mode=KVCacheManagementMode.RECOMPUTE,
            ),
        )
        ctrl = TextGenerationController(inference_wrapped_model=GPTInferenceWrapper(self.model, inference_context=context),
                                        tokenizer=self._tok)
        eng = DynamicInferenceEngine(controller=ctrl, context=context)
        self._built = (eng, ctrl, max_requests, max_seq)
        return eng, ctrl

    def release(self) -> None:
        """Suspend the engine: its KV buffer is freed until the next ``generate``."""
        if self._built is not None:
            self._built[0].suspend()
            torch.cuda.empty_cache()

    def _sample(self, rows, params: RolloutParams, seed: int, return_log_probs: bool):  # pragma: no cover - GPU only
        sp = megatron_sampling_params(params, return_log_probs)
        sp.skip_prompt_log_probs = True
        sp.termination_id = self.stop_ids[0]
        sp.stop_words = list(self._stop_words) or None
        sp.detokenize_stop_sequence = True  # keep the stop token (and its log-prob) in the output
        tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        rows_per_batch = self.max_batch_size or len(rows)
        eng, ctrl = self._engine(dynamic_max_requests(rows_per_batch, tp),
                                 max(len(p) for p in rows) + params.max_new_tokens + 1)
        ctrl.sampling_rng.manual_seed(seed)
        # as StaticInferenceEngine.generate_using_dynamic_engine does: eval mode, fresh context, no autograd
        ctrl.inference_wrapped_model.prep_model_for_inference()
        with torch.inference_mode():
            records = eng.generate(prompts=[list(p) for p in rows], sampling_params=sp)
        responses, logprobs = [], []
        for rec in records:
            r = rec.merge()
            if r.status == Status.FAILED:
                raise RuntimeError(f"dynamic inference engine failed request {r.request_id}: {getattr(r, 'events', '')}")
            g = r.generated_tokens
            responses.append([int(t) for t in (g.tolist() if torch.is_tensor(g) else g)])
            lp = r.generated_log_probs
            logprobs.append([float(x) for x in lp] if return_log_probs and lp is not None else None)
        # the dynamic engine returns the stop token itself: nothing to append
        return responses, logprobs, [False] * len(rows), None
