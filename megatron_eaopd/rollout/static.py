"""The static engine: megatron-core's ``StaticInferenceEngine`` (legacy path) with a KV cache; TP >= 1, PP = 1.

Runs on CPU and GPU. Traps of megatron-core 0.19.2 handled here (docs/cpu.md):

* **Stops.** The legacy path stops only at ``tokenizer.eod`` and ignores
  ``SamplingParams.termination_id``. :class:`_MultiStopController` makes it stop at ANY of the
  engine's stop ids and records which one ended each row (the engine does not return the stop token).
* **Seed.** Sampling draws from ``controller.sampling_rng`` (seeded once at build time; the engine's
  ``random_seed`` only reseeds the *global* RNG on every call): reseeded per call, and the global RNG
  is restored afterwards.
* **Log-probs are raw:** ``log_softmax`` at temperature 1 with no top-p filter, whatever the
  sampling settings; the trainer recomputes old log-probs with its own forward anyway.
* **Inference flag.** The engine sets a process-wide "inference active" flag and never clears it;
  left on, the next training forward asserts: scoped to each call here.
* **Progress bar.** Its ``tqdm`` bar is shown only with ``progress=True``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.engines import StaticInferenceEngine
from megatron.core.inference.engines import static_engine as _static_engine_module
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController
from megatron.core.inference.utils import InferenceMode

from megatron_eaopd.rollout.engine import EngineBase, MegatronTokenizer
from megatron_eaopd.rollout.params import RolloutParams

__all__ = ["StaticEngine", "megatron_sampling_params"]


def megatron_sampling_params(params: RolloutParams, return_log_probs: bool) -> SamplingParams:
    """megatron-core's ``SamplingParams`` for our settings (top-p 1.0 becomes the engine's "off", 0.0,
    which also skips its full-vocabulary sort)."""
    return SamplingParams(
        temperature=float(params.temperature), top_k=0,
        top_p=0.0 if params.top_p >= 1.0 else float(params.top_p),
        num_tokens_to_generate=int(params.max_new_tokens), return_log_probs=bool(return_log_probs),
    )


class _MultiStopController(TextGenerationController):
    """A text-generation controller whose static batches end a row at any of several stop ids.

    ``update_generation_status`` compares the newest token with every stop id (megatron-core compares
    with ``tokenizer.eod`` only), and each request of a finished batch gets ``eaopd_stop_token``: the
    id that ended it, or None (it hit the token budget).
    """

    def __init__(self, *args, stop_ids: Sequence[int], **kwargs):
        super().__init__(*args, **kwargs)
        self._stop_ids = torch.tensor(list(stop_ids), dtype=torch.long)
        self._hit: torch.Tensor | None = None

    def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                 is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
        if termination_id == -1:  # the caller asked for no early termination
            return super().update_generation_status(updated_prompts_tokens, generation_started,
                                                    current_context_end_position, is_generation_done_tensor,
                                                    generated_sequence_lengths, termination_id)
        latest = updated_prompts_tokens[:, current_context_end_position]
        hit = torch.isin(latest, self._stop_ids.to(latest.device)) & generation_started
        if self._hit is None or self._hit.shape != latest.shape:
            self._hit = torch.full_like(latest, -1)
        self._hit = torch.where(hit & ~is_generation_done_tensor & (self._hit < 0), latest, self._hit)
        is_generation_done_tensor = is_generation_done_tensor | hit
        generated_sequence_lengths += ~is_generation_done_tensor & generation_started
        return is_generation_done_tensor, generated_sequence_lengths.int()

    def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
        self._hit = None
        out = super().generate_all_output_tokens_static_batch(active_requests, active_streams)
        hit = self._hit.tolist() if self._hit is not None else []
        for idx, request in enumerate(active_requests.values()):  # request idx is batch row idx
            request.eaopd_stop_token = int(hit[idx]) if idx < len(hit) and hit[idx] >= 0 else None
        return out


@contextlib.contextmanager
def _engine_progress(show: bool):
    """Silence the static engine's module-level ``tqdm`` bar unless ``show``."""
    original = _static_engine_module.tqdm
    if not show:
        _static_engine_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        _static_engine_module.tqdm = original


class StaticEngine(EngineBase):
    """megatron-core's static engine behind :class:`~megatron_eaopd.rollout.engine.RolloutEngine`.

    Args: see :class:`~megatron_eaopd.rollout.engine.EngineBase`. The engine (and its KV cache of
    ``max_batch x max_seq`` positions) is built on first use and rebuilt only when a call needs a
    larger batch or longer sequences.
    Raises:
        ValueError: the model is pipeline-parallel (use the recompute engine).
    """

    kind = "static"

    def __init__(self, model_chunks: list, tokenizer, stop_ids: Sequence[int], **kwargs):
        super().__init__(model_chunks, tokenizer, stop_ids, **kwargs)
        if self.model.config.pipeline_model_parallel_size > 1:
            raise ValueError("the static engine supports pipeline_model_parallel_size == 1 only; use the recompute "
                             "engine (rollout.engine=auto) at PP > 1")
        self._built = None  # (engine, controller, max_batch, max_seq)

    def _engine(self, max_batch: int, max_seq: int):
        b = self._built
        if b is not None and b[2] >= max_batch and b[3] >= max_seq:
            return b[0], b[1]
        self._built = None
        wrapped = GPTInferenceWrapper(self.model, inference_context=StaticInferenceContext(max_batch, max_seq))
        ctrl = _MultiStopController(inference_wrapped_model=wrapped, tokenizer=MegatronTokenizer(self.hf_tokenizer,
                                                                                                 self.stop_ids[0]),
                                    stop_ids=self.stop_ids)
        eng = StaticInferenceEngine(text_generation_controller=ctrl, max_batch_size=max_batch, legacy=True)
        self._built = (eng, ctrl, max_batch, max_seq)
        return eng, ctrl

    def _sample(self, rows, params: RolloutParams, seed: int, return_log_probs: bool):
        sp = megatron_sampling_params(params, return_log_probs)
        max_batch = self.max_batch_size or len(rows)
        max_seq = max(len(p) for p in rows) + params.max_new_tokens + 1
        InferenceMode.set_active()
        try:
            eng, ctrl = self._engine(max_batch, max_seq)
            ctrl.sampling_rng.manual_seed(seed)
            reqs = [InferenceRequest(request_id=eng.get_new_request_id(), prompt="", prompt_tokens=list(p),
                                     sampling_params=sp) for p in rows]
            # the legacy engine reseeds the *global* torch RNG on every call: keep ours
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices), _engine_progress(self.progress):
                out = eng.generate(inference_requests=reqs)
        finally:
            InferenceMode.unset_active()
        for r in reqs:  # the scheduler keeps every finished request; drop ours
            eng.scheduler.completed_request_pool.pop(r.request_id, None)
            eng.scheduler.requests.pop(r.request_id, None)
        responses, logprobs, stopped, hit = [], [], [], []
        for r in out:
            g = r.generated_tokens
            g = [int(t) for t in (g.tolist() if torch.is_tensor(g) else g)]
            responses.append(g)
            logprobs.append(list(r.generated_log_probs) if return_log_probs else None)
            stop = getattr(r, "eaopd_stop_token", None)
            stopped.append(stop is not None or len(g) < sp.num_tokens_to_generate)
            hit.append(stop)
        return responses, logprobs, stopped, hit
