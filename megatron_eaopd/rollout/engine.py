"""The rollout-engine interface, what every engine shares, and the one factory used by training and evaluation.

:class:`RolloutEngine` is the interface: ``generate(prompt ids, RolloutParams) -> RolloutBatch``
plus ``release()`` (free what the engine holds between rollouts). Implementations:

* :class:`~megatron_eaopd.rollout.static.StaticEngine` - megatron-core's ``StaticInferenceEngine``
  (legacy path, KV cache, TP >= 1, PP = 1); CPU and GPU;
* :class:`~megatron_eaopd.rollout.dynamic.DynamicEngine` - ``DynamicInferenceEngine`` (continuous
  batching, paged KV cache); GPU with a flash-attn megatron-core accepts;
* :class:`~megatron_eaopd.rollout.recompute.RecomputeEngine` - a full forward per new token through
  Megatron's pipeline schedule; any TP/PP (the PP > 1 path).

:func:`megatron_eaopd.rollout.factory.make_engine` picks one.

Every engine, the same way (:class:`EngineBase`): stops on ANY of its stop ids inside the engine
(:func:`megatron_eaopd.rollout.stops.stop_token_ids`), never samples a padded vocabulary row (logits of
ids >= the true vocabulary are -inf during sampling: Megatron pads the output layer to a multiple of
128 x TP and those rows hold logit 0, not -inf), reseeds its sampler per call with
:func:`~megatron_eaopd.rollout.params.sampling_seed` (so TP ranks of one replica draw identical samples
and a run is reproducible) and leaves the global torch RNG untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Protocol, Sequence, runtime_checkable

import torch
from megatron.core import parallel_state as ps

from megatron_eaopd.rollout.batch import RolloutBatch, assemble_batch
from megatron_eaopd.rollout.params import RolloutParams, sampling_seed

__all__ = ["RolloutEngine", "EngineBase", "MegatronTokenizer", "mask_padded_vocab", "dp_rank"]


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from the student (collective over the model's TP/PP group).

    Attributes:
        kind: ``"static"``, ``"dynamic"`` or ``"recompute"``.
        stop_ids: ids that end a response (the first is also the padding id).
    """

    kind: str
    stop_ids: tuple[int, ...]

    def generate(self, prompts: Sequence[Sequence[int]], params: RolloutParams, *, call_index: int | None = None,
                 return_log_probs: bool = False) -> RolloutBatch:
        """``params.n`` samples per prompt -> a :class:`RolloutBatch` (B = prompts x n, prompt-major)."""
        ...

    def release(self) -> None:
        """Free memory the engine holds between rollouts (KV cache); the next ``generate`` re-acquires it."""
        ...


class MegatronTokenizer:
    """The small tokenizer interface megatron-core's ``TextGenerationController`` reads.

    Wraps a Hugging Face tokenizer (anything with ``encode(text, add_special_tokens=False)``,
    ``decode(ids, skip_special_tokens=...)`` and ``len()``).

    Args:
        hf_tokenizer: the tokenizer.
        eod: the engine's primary stop id, also its padding id.
    """

    bos = None  # the controller strips a leading ``bos`` from text prompts; never strip ours

    def __init__(self, hf_tokenizer, eod: int):
        self.hf = hf_tokenizer
        self.eod = int(eod)
        self.pad = self.eod
        self.vocab_size = len(hf_tokenizer)

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (special-token strings map to their ids)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids -> text."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def offsets(self, ids, text: str) -> list[int]:
        """Character start offset of each token in ``text`` (by decoding prefixes; O(n^2), only
        used by the engine when ``return_segments`` is set)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out, prev = [], 0
        for i in range(len(ids)):
            out.append(min(prev, len(text)))
            prev = len(self.hf.decode(ids[: i + 1], skip_special_tokens=False))
        return out


def dp_rank() -> int:
    """This process's data-parallel rank (0 without Megatron's parallel state)."""
    return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def mask_padded_vocab(model, true_vocab_size: int | None):
    """While active, logits of ids ``>= true_vocab_size`` leave ``model``'s forward as -inf.

    A forward hook on the (unwrapped) ``GPTModel``: inference gathers the logits over TP
    (``runtime_gather_output=True``), so the hook sees the padded vocabulary ``[..., V_padded]``; a
    vocab-sharded output ``[..., V_padded / TP]`` is masked at this TP rank's offset. Outside the
    context the model is untouched (training forwards keep their logits).

    Args:
        model: a ``GPTModel`` (wrapped or not) with the last pipeline stage's output layer.
        true_vocab_size: the tokenizer's vocabulary V; None = nothing to mask.
    """
    m = _unwrap(model)
    if true_vocab_size is None or not getattr(m, "post_process", True):  # only the last stage makes logits
        yield
        return
    padded = int(getattr(m, "vocab_size", true_vocab_size))

    def hook(_module, _args, output):
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            return output
        width = output.shape[-1]
        # gathered (inference): [..., V_padded]; vocab-sharded: [..., V_padded / TP] at this rank's offset
        lo = 0 if width == padded else ps.get_tensor_model_parallel_rank() * width
        if lo + width <= true_vocab_size:
            return output
        cols = torch.arange(lo, lo + width, device=output.device) >= true_vocab_size
        return output.masked_fill(cols, float("-inf"))

    handle = m.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class EngineBase:
    """What every engine does the same way around its own sampling loop (see the module docstring).

    Subclasses implement ``_sample(rows, params, seed, return_log_probs) -> (responses, logprobs,
    engine_stopped, stop_tokens)`` for the already expanded rows (each prompt ``n`` times).

    Args:
        model_chunks: the student's model chunks at the current TP/PP (DDP-wrapped or not).
        tokenizer: the Hugging Face tokenizer (decoding; ``len()`` for the controller).
        stop_ids: ids that end a response (>= 1; the first is the padding id).
        true_vocab_size: the tokenizer's vocabulary (padded rows beyond it are never sampled).
        max_batch_size: sequences per engine batch (None: all rows of a call).
        progress: show the engine's own progress bar.
    Raises:
        ValueError: no stop id.
    """

    kind = "base"

    def __init__(self, model_chunks: list, tokenizer, stop_ids: Sequence[int], *, true_vocab_size: int | None = None,
                 max_batch_size: int | None = None, progress: bool = False):
        if not stop_ids:
            raise ValueError("a rollout engine needs at least one stop id (see rollout.stops.stop_token_ids)")
        self.chunks = list(model_chunks)
        self.model = _unwrap(self.chunks[0])
        self.hf_tokenizer = tokenizer
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.true_vocab_size = true_vocab_size if true_vocab_size is not None else getattr(self.model, "true_vocab_size",
                                                                                           None)
        self.max_batch_size = max_batch_size
        self.progress = progress
        self.calls = 0  # generate() calls so far: the default call index

    def generate(self, prompts: Sequence[Sequence[int]], params: RolloutParams, *, call_index: int | None = None,
                 return_log_probs: bool = False) -> RolloutBatch:
        """Sample ``params.n`` responses for each prompt (collective over the model's TP/PP group).

        Args:
            prompts: P prompt token-id lists (each >= 1 token; lengths may differ).
            params: :class:`RolloutParams`.
            call_index: which call this is, for seeding (default: the number of earlier calls). The
                sampler is reseeded with ``sampling_seed(params.seed, call_index, dp_rank)``.
            return_log_probs: ask the engine for its raw log-probs (``RolloutBatch.raw_logprobs``).
        Returns:
            :class:`RolloutBatch` with B = P x n rows (prompt-major), CPU tensors.
        Raises:
            ValueError: no prompts or an empty prompt.
            RuntimeError: the engine failed a request (e.g. longer than its buffer).
        """
        rows = [[int(t) for t in p] for p in prompts for _ in range(params.n)]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
        pidx = [i for i in range(len(prompts)) for _ in range(params.n)]
        ci = self.calls if call_index is None else int(call_index)
        self.calls += 1
        seed = sampling_seed(params.seed, ci, dp_rank())
        with mask_padded_vocab(self.model, self.true_vocab_size), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            responses, logprobs, stopped, hit = self._sample(rows, params, seed, return_log_probs)
        for c in self.chunks:
            c.train()
        decode = lambda ids: self.hf_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return assemble_batch(rows, responses, logprobs, stopped, self.stop_ids, params.max_new_tokens, pidx,
                              decode=decode, seed=seed, stop_tokens=hit)

    def release(self) -> None:
        """Nothing to free by default."""

    def _sample(self, rows, params: RolloutParams, seed: int, return_log_probs: bool):  # pragma: no cover - abstract
        raise NotImplementedError
