"""Student rollouts with megatron-core's inference engine (megatron-core 0.19.2).

:class:`Rollout` samples ``n`` responses per prompt from a built Megatron ``GPTModel`` and returns a
:class:`RolloutBatch`: right-padded token ids plus masks and log-probs aligned to what the logits
predict. Engines:

* **static** (``StaticInferenceEngine(legacy=True)`` + ``StaticInferenceContext``): CPU and GPU,
  TP >= 1, PP = 1. Used on CPU (the non-legacy path silently falls back to it there anyway).
* **dynamic** (``DynamicInferenceEngine`` + ``DynamicInferenceContext``): GPU only (needs
  flash-attn / CUDA); chosen by ``engine="auto"`` when CUDA is available.

Layout of a :class:`RolloutBatch` (B = prompts x n rows, prompt-major: rows ``i*n .. i*n+n-1`` are
prompt ``i``'s samples; S = longest prompt + response in the batch)::

    tokens        [B, S]    int64   prompt | response (| EOS) | pad ...
    targets_*     [B, S-1]          row [b, s] describes tokens[b, s+1], the token that the
                                    logits at [b, s] predict (inputs = tokens[:, :-1])
    loss_mask     [B, S-1]  bool    True where tokens[b, s+1] is a response token (incl. EOS)
    raw_logprobs  [B, S-1]  float32 engine log-prob of tokens[b, s+1] where logprob_mask, else 0
    logprob_mask  [B, S-1]  bool    True where the engine returned that log-prob

Traps handled here (shared/docs/megatron_cpu.md, "Sampling, log-probs and a real model on CPU"):

* **EOS.** The static engine stops at ``tokenizer.eod`` (one id; ``SamplingParams.termination_id``
  is ignored) and does not return the EOS token or its log-prob. The dynamic engine returns it.
  Both are normalised: a response that stopped gets exactly one EOS appended (``finished=True``)
  so the policy learns to stop; with the static engine that EOS position has
  ``logprob_mask=False``. Any further ``eos_ids`` are applied afterwards by cutting the response
  at their first occurrence (a valid sample: tokens after a stop do not matter).
* **Log-probs are raw.** The engines return ``log_softmax(logits)`` at temperature 1 with no
  top-p filter, whatever the sampling temperature/top-p; they are *not* the sampling
  distribution's log-probs unless T = 1 and top_p = 1. The trainer recomputes old log-probs with
  a full forward anyway (method.md: "old log-probs recomputed by the trainer"); use these only for
  monitoring or as a cross-check.
* **Seed.** Sampling draws from ``controller.sampling_rng`` (seeded once at build time; the
  engine's ``random_seed`` does not drive it). Each :meth:`Rollout.generate` call reseeds it with
  :func:`sampling_seed` (``seed``, call index, DP rank), so a run is reproducible and TP ranks of
  one DP group draw identical samples.
* **Padded vocabulary.** The engine samples over the model's (padded) vocabulary; rows beyond the
  tokenizer's true vocabulary are only suppressed by the weights (true for converted HF models).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "RolloutParams",
    "RolloutBatch",
    "MegatronTokenizer",
    "Rollout",
    "MegatronGenerator",
    "sampling_seed",
    "assemble_batch",
]


@dataclass(frozen=True)
class RolloutParams:
    """Sampling settings for one :meth:`Rollout.generate` call.

    Attributes:
        temperature: > 0 (paper 1.0). top_p: in (0, 1] (paper 1.0; 1.0 = no filter).
        max_new_tokens: response budget in tokens, EOS not counted (paper 4096).
        n: samples per prompt. seed: base seed (see :func:`sampling_seed`).
        eos_ids: stop ids; the first is the engine's stop/pad id. Empty = the tokenizer's EOS.
        return_log_probs: ask the engine for raw log-probs (static engine: costs a full-vocab
            log-softmax over the prompt logits at prefill).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1
    seed: int = 1234
    eos_ids: tuple[int, ...] = ()
    return_log_probs: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens}, {self.n}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

    @classmethod
    def from_config(cls, rollout_cfg, eos_ids: Sequence[int] = (), return_log_probs: bool = True) -> "RolloutParams":
        """From the ``rollout`` section of :class:`megatron_eaopd.config.Config` (duck-typed:
        ``temperature``, ``top_p``, ``max_new_tokens``, ``n``, ``seed``)."""
        return cls(
            temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, max_new_tokens=rollout_cfg.max_new_tokens,
            n=rollout_cfg.n, seed=rollout_cfg.seed, eos_ids=tuple(eos_ids), return_log_probs=return_log_probs,
        )


@dataclass
class RolloutBatch:
    """Sampled sequences, right-padded; see the module docstring for the exact layout.

    Attributes (B rows, S = max total length):
        tokens: [B, S] int64, prompt + response (+ EOS if finished) + ``pad_id`` padding.
        prompt_lengths: [B] int64, prompt tokens per row.
        response_lengths: [B] int64, response tokens per row, including the appended EOS.
        loss_mask: [B, S-1] bool, True where ``tokens[:, s+1]`` is a response token.
        raw_logprobs: [B, S-1] float32, the engine's T=1, unfiltered log-prob of ``tokens[:, s+1]``
            (nats), 0 where ``logprob_mask`` is False. Not the sampling distribution's log-prob
            unless temperature = 1 and top_p = 1.
        logprob_mask: [B, S-1] bool, where ``raw_logprobs`` holds an engine value (response
            tokens; not a static-engine EOS; all False when log-probs were not requested).
        finished: [B] bool, True = stopped at an EOS id, False = hit ``max_new_tokens``.
        prompt_index: [B] int64, index of the row's prompt in the input list.
        response_texts: decoded responses (EOS and special tokens skipped).
        pad_id: id used for padding (the first EOS id).
        seed: the sampling seed this batch was drawn with.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    loss_mask: torch.Tensor
    raw_logprobs: torch.Tensor
    logprob_mask: torch.Tensor
    finished: torch.Tensor
    prompt_index: torch.Tensor
    response_texts: list[str] = field(default_factory=list)
    pad_id: int = 0
    seed: int = 0

    @property
    def inputs(self) -> torch.Tensor:
        """[B, S-1] model inputs ``tokens[:, :-1]``."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """[B, S-1] targets ``tokens[:, 1:]`` (what the logits at each input position predict)."""
        return self.tokens[:, 1:]

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, S-1] int64 positions ``0..S-2`` for the inputs."""
        b, s = self.tokens.shape
        return torch.arange(s - 1, dtype=torch.long).unsqueeze(0).expand(b, s - 1).contiguous()

    @property
    def num_response_tokens(self) -> int:
        """Total response tokens (the loss denominator), ``loss_mask.sum()``."""
        return int(self.loss_mask.sum())

    def response_tokens(self, b: int) -> list[int]:
        """Response ids of row ``b`` (including the appended EOS if finished)."""
        p, r = int(self.prompt_lengths[b]), int(self.response_lengths[b])
        return self.tokens[b, p : p + r].tolist()


class MegatronTokenizer:
    """The small tokenizer interface megatron-core's ``TextGenerationController`` reads.

    Wraps a Hugging Face tokenizer (anything with ``encode(text, add_special_tokens=False)``,
    ``decode(ids, skip_special_tokens=...)`` and ``len()``).

    Args:
        hf_tokenizer: the tokenizer.
        eod: the engine's stop and pad id (static engine: the only stop id). Default: the
            tokenizer's ``eos_token_id``.
    Raises:
        ValueError: if no EOS id is known.
    """

    bos = None  # the controller strips leading ``bos`` from text prompts; never strip ours

    def __init__(self, hf_tokenizer, eod: int | None = None):
        self.hf = hf_tokenizer
        eod = eod if eod is not None else getattr(hf_tokenizer, "eos_token_id", None)
        if eod is None:
            raise ValueError("MegatronTokenizer needs an EOS id: pass eod= or use a tokenizer with eos_token_id")
        self.eod = int(eod)
        self.pad = self.eod
        self.vocab_size = len(hf_tokenizer)

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added."""
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


def sampling_seed(seed: int, call_index: int, dp_rank: int = 0) -> int:
    """Seed of ``controller.sampling_rng`` for one generate call.

    ``seed + 1_000_003 * call_index + 7_919 * dp_rank`` (mod 2**63): distinct per call and per DP
    rank, identical across the TP ranks of one DP group (they sample from the same gathered
    logits, nothing is broadcast).
    """
    return (int(seed) + 1_000_003 * int(call_index) + 7_919 * int(dp_rank)) % (2**63)


def assemble_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float] | None],
    engine_stopped: Sequence[bool],
    eos_ids: Sequence[int],
    max_new_tokens: int,
    prompt_index: Sequence[int] | None = None,
    decode=None,
    seed: int = 0,
) -> RolloutBatch:
    """Build a :class:`RolloutBatch` from per-row engine outputs (pure tensor bookkeeping).

    Args:
        prompts: B prompt id lists (may differ in length; each >= 1 token).
        responses: B generated id lists as the engine returned them (static engine: without the
            EOS; dynamic engine: with it).
        logprobs: B lists of raw log-probs, one per entry of ``responses`` (or None).
        engine_stopped: B flags, True when the engine stopped the row at an EOS that it did not
            return (static engine: ``len(response) < max_new_tokens``).
        eos_ids: stop ids, the first is appended / used for padding (>= 1 id).
        max_new_tokens: response budget (EOS not counted).
        prompt_index: B prompt indices (default ``range(B)``).
        decode: ``ids -> str`` for ``response_texts`` (default: no texts).
        seed: recorded in the batch.
    Returns:
        RolloutBatch (CPU tensors).
    Raises:
        ValueError: on empty inputs, mismatched lengths, or an empty prompt.
    """
    if not eos_ids:
        raise ValueError("assemble_batch needs at least one EOS id")
    bsz = len(prompts)
    if bsz == 0 or not (len(responses) == len(logprobs) == len(engine_stopped) == bsz):
        raise ValueError(
            f"need equally many (>0) prompts/responses/logprobs/flags, got {bsz}/{len(responses)}/"
            f"{len(logprobs)}/{len(engine_stopped)}"
        )
    eos_set, eos0 = {int(e) for e in eos_ids}, int(eos_ids[0])
    rows = []
    for p, r, lp, stopped in zip(prompts, responses, logprobs, engine_stopped):
        p, r = [int(t) for t in p], [int(t) for t in r]
        if not p:
            raise ValueError("empty prompt: every prompt needs at least one token")
        lp = None if lp is None else [float(x) for x in lp]
        if lp is not None and len(lp) != len(r):
            raise ValueError(f"{len(lp)} log-probs for {len(r)} generated tokens")
        cut = next((i for i, t in enumerate(r) if t in eos_set), None)
        if cut is not None:  # EOS returned by the engine (dynamic) or a secondary stop id
            r_tokens, has_lp = r[: cut + 1], [lp is not None] * (cut + 1)
            lp = lp[: cut + 1] if lp is not None else None
            finished = True
        elif stopped:  # static engine: stopped at eod without returning it
            r_tokens, has_lp = r + [eos0], [lp is not None] * len(r) + [False]
            lp = (lp + [0.0]) if lp is not None else None
            finished = True
        else:
            r_tokens, has_lp, finished = r[:max_new_tokens], [lp is not None] * min(len(r), max_new_tokens), False
            lp = lp[:max_new_tokens] if lp is not None else None
        rows.append((p, r_tokens, lp, has_lp, finished))

    seq = max(len(p) + len(r) for p, r, *_ in rows)
    seq = max(seq, 2)
    tokens = torch.full((bsz, seq), eos0, dtype=torch.long)
    loss_mask = torch.zeros((bsz, seq - 1), dtype=torch.bool)
    logprob_mask = torch.zeros((bsz, seq - 1), dtype=torch.bool)
    raw = torch.zeros((bsz, seq - 1), dtype=torch.float32)
    plen = torch.zeros(bsz, dtype=torch.long)
    rlen = torch.zeros(bsz, dtype=torch.long)
    fin = torch.zeros(bsz, dtype=torch.bool)
    texts = []
    for b, (p, r, lp, has_lp, finished) in enumerate(rows):
        n_p, n_r = len(p), len(r)
        tokens[b, : n_p + n_r] = torch.tensor(p + r, dtype=torch.long)
        # target position s predicts tokens[s+1]; response token j sits at n_p + j -> s = n_p - 1 + j
        loss_mask[b, n_p - 1 : n_p - 1 + n_r] = True
        if n_r:
            logprob_mask[b, n_p - 1 : n_p - 1 + n_r] = torch.tensor(has_lp, dtype=torch.bool)
            if lp is not None:
                raw[b, n_p - 1 : n_p - 1 + n_r] = torch.tensor(lp, dtype=torch.float32)
        raw[b] = torch.where(logprob_mask[b], raw[b], torch.zeros_like(raw[b]))
        plen[b], rlen[b], fin[b] = n_p, n_r, finished
        if decode is not None:
            texts.append(decode([t for t in r if t not in eos_set]))
    idx = torch.tensor(list(prompt_index) if prompt_index is not None else range(bsz), dtype=torch.long)
    return RolloutBatch(tokens, plen, rlen, loss_mask, raw, logprob_mask, fin, idx, texts, eos0, seed)


def _dp_rank() -> int:
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_data_parallel_rank()
    except Exception:  # pragma: no cover - parallel state absent
        pass
    return 0


class Rollout:
    """Samples responses from a Megatron ``GPTModel`` with megatron-core's inference engine.

    Args:
        model: a built ``GPTModel`` (TP >= 1, PP = 1), unwrapped or wrapped in DDP/Float16Module.
            Put in eval mode by the engine; call ``model.train()`` before training again.
        tokenizer: a Hugging Face tokenizer (wrapped in :class:`MegatronTokenizer`) or a
            :class:`MegatronTokenizer`.
        engine: ``auto`` (dynamic with CUDA, static otherwise), ``static`` or ``dynamic``.
        max_batch_size: prompts x n sequences per engine batch (static: more are run as several
            batches; default = all rows of a call).
        dynamic_buffer_size_gb: KV-cache buffer of the dynamic engine (GPU memory).
    Raises:
        ValueError: PP > 1 (the static engine path here is PP = 1 only); unknown engine.
        RuntimeError: ``engine="dynamic"`` without CUDA.
    """

    def __init__(
        self,
        model,
        tokenizer,
        engine: str = "auto",
        max_batch_size: int | None = None,
        dynamic_buffer_size_gb: float = 20.0,
    ):
        from megatron.core.utils import get_model_config

        cfg = get_model_config(model)
        if cfg.pipeline_model_parallel_size > 1:
            raise ValueError(
                f"Rollout supports pipeline_model_parallel_size == 1 only (got {cfg.pipeline_model_parallel_size}): "
                "sample with a PP=1 student layout (parallel.pp=1) or reshard the weights for rollout"
            )
        if engine not in ("auto", "static", "dynamic"):
            raise ValueError(f"engine must be 'auto', 'static' or 'dynamic', got {engine!r}")
        if engine == "auto":
            engine = "dynamic" if torch.cuda.is_available() else "static"
        if engine == "dynamic" and not torch.cuda.is_available():
            raise RuntimeError("the dynamic inference engine needs CUDA (flash-attn); use engine='static' on CPU")
        self.model = model
        self.config = cfg
        self.engine_kind = engine
        self.hf_tokenizer = tokenizer.hf if isinstance(tokenizer, MegatronTokenizer) else tokenizer
        self._base_tok = tokenizer if isinstance(tokenizer, MegatronTokenizer) else None
        self.max_batch_size = max_batch_size
        self.dynamic_buffer_size_gb = dynamic_buffer_size_gb
        self.calls = 0  # number of generate() calls so far (the default call index)
        self._static = None  # (engine, controller, max_batch, max_seq, eod)
        self._dynamic = None  # (engine, controller, max_seq, eod)

    @classmethod
    def from_config(cls, model, tokenizer, rollout_cfg) -> "Rollout":
        """From the ``rollout`` section of the config (``engine``, ``max_batch_size``, ``kv_buffer_gb``)."""
        return cls(
            model, tokenizer, engine=rollout_cfg.engine, max_batch_size=rollout_cfg.max_batch_size,
            dynamic_buffer_size_gb=rollout_cfg.kv_buffer_gb,
        )

    # ---- engine construction -------------------------------------------------------------
    def _tokenizer(self, eod: int) -> MegatronTokenizer:
        if self._base_tok is not None and self._base_tok.eod == eod:
            return self._base_tok
        return MegatronTokenizer(self.hf_tokenizer, eod=eod)

    def _static_engine(self, max_batch: int, max_seq: int, eod: int):
        st = self._static
        if st is not None and st[2] >= max_batch and st[3] >= max_seq and st[4] == eod:
            return st[0], st[1]
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        wrapped = GPTInferenceWrapper(self.model, inference_context=StaticInferenceContext(max_batch, max_seq))
        ctrl = TextGenerationController(inference_wrapped_model=wrapped, tokenizer=self._tokenizer(eod))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eng = StaticInferenceEngine(text_generation_controller=ctrl, max_batch_size=max_batch, legacy=True)
        self._static = (eng, ctrl, max_batch, max_seq, eod)
        return eng, ctrl

    def _dynamic_engine(self, max_batch: int, max_seq: int, eod: int):
        dy = self._dynamic
        if dy is not None and dy[2] >= max_seq and dy[3] == eod and dy[4] >= max_batch:
            return dy[0], dy[1]
        from megatron.core.inference.config import InferenceConfig
        from megatron.core.inference.contexts import DynamicInferenceContext
        from megatron.core.inference.engines import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        context = DynamicInferenceContext(
            model_config=self.config,
            inference_config=InferenceConfig(
                max_sequence_length=max_seq,
                buffer_size_gb=self.dynamic_buffer_size_gb,
                max_requests=max_batch,
                num_cuda_graphs=None,  # no CUDA graphs: weights change between rollouts
                unified_memory_level=0,
                materialize_only_last_token_logits=True,  # no prompt log-probs (skip_prompt_log_probs)
                logprobs_mode="raw_logprobs",
                offset_sampling_seed_by_dp_rank=False,  # reseeded per call by sampling_seed()
            ),
        )
        wrapped = GPTInferenceWrapper(self.model, inference_context=context)
        ctrl = TextGenerationController(inference_wrapped_model=wrapped, tokenizer=self._tokenizer(eod))
        eng = DynamicInferenceEngine(controller=ctrl, context=context)
        self._dynamic = (eng, ctrl, max_seq, eod, max_batch)
        return eng, ctrl

    # ---- sampling ------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: RolloutParams, call_index: int | None = None
    ) -> RolloutBatch:
        """Sample ``params.n`` responses for each prompt.

        Must be called on every rank of the model's TP group with the same prompts (collective).

        Args:
            prompts: P prompt token-id lists (each >= 1 token; lengths may differ).
            params: :class:`RolloutParams`.
            call_index: which call this is for seeding (default: the number of previous calls on
                this object). The sampling RNG is reseeded with
                ``sampling_seed(params.seed, call_index, dp_rank)``.
        Returns:
            :class:`RolloutBatch` with B = P * n rows (prompt-major), CPU tensors.
        Raises:
            ValueError: no prompts, an empty prompt, or no EOS id known.
            RuntimeError: the dynamic engine failed a request (e.g. too long for its buffer).
        """
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
        eos_ids = params.eos_ids
        if not eos_ids:
            eos = getattr(self.hf_tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("no EOS id: set RolloutParams.eos_ids or use a tokenizer with eos_token_id")
            eos_ids = (int(eos),)
        rows = [p for p in prompts for _ in range(params.n)]
        pidx = [i for i in range(len(prompts)) for _ in range(params.n)]
        ci = self.calls if call_index is None else int(call_index)
        self.calls += 1
        seed = sampling_seed(params.seed, ci, _dp_rank())
        max_batch = self.max_batch_size or len(rows)
        max_seq = max(len(p) for p in rows) + params.max_new_tokens + 1

        from megatron.core.inference.sampling_params import SamplingParams

        sp = SamplingParams(
            temperature=float(params.temperature),
            top_k=0,
            # top_p 1.0 keeps every token; 0.0 is the engine's "off" and skips the full-vocab sort
            top_p=0.0 if params.top_p >= 1.0 else float(params.top_p),
            num_tokens_to_generate=int(params.max_new_tokens),
            return_log_probs=bool(params.return_log_probs),
        )
        from megatron.core.inference.utils import InferenceMode

        # megatron-core's engines set a process-wide "inference active" flag (the static engine in its
        # constructor) and never clear it; left on, the next training forward asserts. Scope it here.
        InferenceMode.set_active()
        try:
            if self.engine_kind == "static":
                responses, logprobs, stopped = self._run_static(rows, sp, max_batch, max_seq, eos_ids[0], seed)
            else:
                responses, logprobs, stopped = self._run_dynamic(rows, sp, max_batch, max_seq, eos_ids[0], seed)
        finally:
            InferenceMode.unset_active()
        decode = lambda ids: self.hf_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return assemble_batch(
            rows, responses, logprobs, stopped, eos_ids, params.max_new_tokens, pidx, decode=decode, seed=seed
        )

    def _run_static(self, rows, sp, max_batch, max_seq, eod, seed):
        from megatron.core.inference.inference_request import InferenceRequest

        eng, ctrl = self._static_engine(max_batch, max_seq, eod)
        ctrl.sampling_rng.manual_seed(seed)
        reqs = [
            InferenceRequest(
                request_id=eng.get_new_request_id(), prompt="", prompt_tokens=list(p), sampling_params=sp
            )
            for p in rows
        ]
        # the legacy engine reseeds the *global* torch RNG (random_seed=1234) on every call: keep ours
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with warnings.catch_warnings(), torch.random.fork_rng(devices=devices):
            warnings.simplefilter("ignore")
            out = eng.generate(inference_requests=reqs)
        for r in reqs:  # the scheduler keeps every finished request; drop ours
            eng.scheduler.completed_request_pool.pop(r.request_id, None)
            eng.scheduler.requests.pop(r.request_id, None)
        responses, logprobs, stopped = [], [], []
        for r in out:
            g = [int(t) for t in (r.generated_tokens.tolist() if torch.is_tensor(r.generated_tokens) else r.generated_tokens)]
            responses.append(g)
            logprobs.append(list(r.generated_log_probs) if sp.return_log_probs else None)
            stopped.append(len(g) < sp.num_tokens_to_generate)  # static: EOS dropped, row shorter
        return responses, logprobs, stopped

    def _run_dynamic(self, rows, sp, max_batch, max_seq, eod, seed):  # pragma: no cover - GPU only
        from megatron.core.inference.inference_request import Status

        eng, ctrl = self._dynamic_engine(max_batch, max_seq, eod)
        ctrl.sampling_rng.manual_seed(seed)
        sp.skip_prompt_log_probs = True
        sp.termination_id = eod
        # as StaticInferenceEngine.generate_using_dynamic_engine does: eval mode, fresh context, no autograd
        ctrl.inference_wrapped_model.prep_model_for_inference()
        with torch.inference_mode():
            records = eng.generate(prompts=[list(p) for p in rows], sampling_params=sp)
        responses, logprobs, stopped = [], [], []
        for rec in records:
            r = rec.merge()
            if r.status == Status.FAILED:
                raise RuntimeError(f"dynamic inference engine failed request {r.request_id}: {getattr(r, 'events', '')}")
            g = [int(t) for t in (r.generated_tokens.tolist() if torch.is_tensor(r.generated_tokens) else r.generated_tokens)]
            responses.append(g)
            lp = r.generated_log_probs
            logprobs.append([float(x) for x in lp] if sp.return_log_probs and lp is not None else None)
            stopped.append(False)  # the dynamic engine returns the EOS token itself
        return responses, logprobs, stopped


@dataclass
class _Sample:
    """Fallback of ``megatron_eaopd.evaluation``'s Sample (text, num_tokens, truncated)."""

    text: str
    num_tokens: int
    truncated: bool


def _sample_cls():
    try:
        from megatron_eaopd.evaluation.runner import Sample  # type: ignore

        return Sample
    except Exception:
        return _Sample


class MegatronGenerator:
    """Evaluation adaptor: the ``Generator`` protocol of ``megatron_eaopd.evaluation.runner``.

    ``generate(prompts, n, seed)`` renders each prompt text (optionally with the tokenizer's chat
    template), samples ``n`` responses with :class:`Rollout` and returns, per prompt, ``n`` samples
    with ``text``, ``num_tokens`` (response tokens, EOS excluded) and ``truncated`` (hit
    ``max_new_tokens``).

    Args:
        rollout: a :class:`Rollout`.
        max_new_tokens, temperature, top_p: sampling settings (paper eval: 8192, 1.0, 0.8).
        chat_template: wrap each prompt as one user turn with the tokenizer's chat template.
        chat_template_kwargs: passed to ``apply_chat_template`` (e.g. ``enable_thinking=False``).
        eos_ids: stop ids (default: the tokenizer's EOS).
        batch_size: prompts per engine call (None = all).
    """

    def __init__(
        self,
        rollout: Rollout,
        max_new_tokens: int = 8192,
        temperature: float = 1.0,
        top_p: float = 0.8,
        chat_template: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        eos_ids: Sequence[int] = (),
        batch_size: int | None = None,
    ):
        self.rollout = rollout
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.chat_template = chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.eos_ids = tuple(eos_ids)
        self.batch_size = batch_size

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids (chat template applied when configured)."""
        tok = self.rollout.hf_tokenizer
        if self.chat_template:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                **self.chat_template_kwargs,
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tok.encode(text, add_special_tokens=False))

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Any]]:
        """Sample ``n`` responses per prompt; returns ``[len(prompts)][n]`` Sample objects.

        Collective over the model's TP group. Deterministic for a given ``seed`` (the call index
        is the batch index within this call).
        """
        Sample = _sample_cls()
        params = RolloutParams(
            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, n=n,
            seed=seed, eos_ids=self.eos_ids, return_log_probs=False,
        )
        ids = [self.encode(p) for p in prompts]
        bs = self.batch_size or max(1, len(ids))
        out: list[list[Any]] = []
        for ci, start in enumerate(range(0, len(ids), bs)):
            batch = self.rollout.generate(ids[start : start + bs], params, call_index=ci)
            for i in range(len(batch.response_texts) // n):
                group = []
                for b in range(i * n, (i + 1) * n):
                    fin = bool(batch.finished[b])
                    group.append(Sample(
                        text=batch.response_texts[b],
                        num_tokens=int(batch.response_lengths[b]) - int(fin),
                        truncated=not fin,
                    ))
                out.append(group)
        return out


@torch.no_grad()
def sample_with_recompute(model_chunks, tokenizer, prompts: Sequence[Sequence[int]], params: RolloutParams,
                          call_index: int = 0) -> RolloutBatch:
    """Sample through any TP/PP layout without a KV cache (one full forward per new token).

    The pipeline-parallel fallback for :class:`Rollout` (whose engines here are PP = 1): every step
    runs the prefix through ``get_forward_backward_func`` (forward only), the last stage gathers the
    vocab-parallel logits of each row's last position across TP, masks padded vocabulary rows,
    applies temperature and top-p, samples with a seeded generator and broadcasts the tokens to the
    other stages. Cost is O(S^2) per sequence: meant for PP > 1 on small models and tests, not for
    production rollouts (use PP = 1 rollout layouts there).

    Args:
        model_chunks: the student's model chunks (DDP-wrapped or not) at the current TP/PP.
        tokenizer: HF tokenizer (``eos_token_id`` fallback and decoding).
        prompts, params, call_index: as in :meth:`Rollout.generate`.
    Returns:
        :class:`RolloutBatch` (no engine log-probs: ``logprob_mask`` all False).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_eaopd.pipeline import MicroBatch, forward_only

    eos_ids = params.eos_ids or (int(tokenizer.eos_token_id),)
    rows = [[int(t) for t in p] for p in prompts for _ in range(params.n)]
    pidx = [i for i in range(len(prompts)) for _ in range(params.n)]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("sample_with_recompute needs at least one non-empty prompt")
    model = model_chunks[0]
    while hasattr(model, "module"):
        model = model.module
    true_v = getattr(model, "true_vocab_size", None)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    b = len(rows)
    cur = torch.tensor([len(r) for r in rows])
    total = int(cur.max()) + params.max_new_tokens
    tokens = torch.full((b, total), eos_ids[0], dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    gen = torch.Generator().manual_seed(sampling_seed(params.seed, call_index, _dp_rank()))
    responses: list[list[int]] = [[] for _ in rows]
    stopped = [False] * b
    for _ in range(params.max_new_tokens):
        s = int(cur.max())
        mb = MicroBatch(0, slice(0, b), tokens[:, :s].to(dev), torch.arange(s).expand(b, s).contiguous().to(dev),
                        tokens[:, 1: s + 1].to(dev), torch.zeros(b, s, dtype=torch.bool, device=dev))
        nxt = torch.zeros(b, dtype=torch.long, device=dev)

        def on_logits(mb_, logits):
            last = logits[torch.arange(b, device=logits.device), (cur - 1).to(logits.device)].float()
            full = gather_from_tensor_model_parallel_region(last) if ps.get_tensor_model_parallel_world_size() > 1 else last
            if true_v is not None:
                full[:, true_v:] = float("-inf")
            probs = torch.softmax(full / params.temperature, dim=-1).cpu()
            if params.top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                drop = sp.cumsum(-1) - sp > params.top_p
                sp[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(-1, si, sp)
            nxt.copy_(torch.multinomial(probs, 1, generator=gen)[:, 0].to(nxt.device))

        forward_only(model_chunks, [mb], on_logits)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        nxt = nxt.cpu()
        for i in range(b):
            if stopped[i] or len(responses[i]) >= params.max_new_tokens:
                continue
            t = int(nxt[i])
            if t in eos_ids:
                stopped[i] = True
                continue
            responses[i].append(t)
            tokens[i, int(cur[i])] = t
            cur[i] += 1
        if all(stopped[i] or len(responses[i]) >= params.max_new_tokens for i in range(b)):
            break
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return assemble_batch(rows, responses, [None] * b, stopped, eos_ids, params.max_new_tokens, pidx, decode=decode,
                          seed=sampling_seed(params.seed, call_index, _dp_rank()))
