"""Model-backed generation for the evaluation runner: load a model, sample through any TP/PP/DP layout.

Pieces (all follow the ``Generator`` protocol of :mod:`megatron_eaopd.evaluation.runner`):

* :func:`load_eval_model` builds this rank's ``GPTModel`` at the current TP/PP from a Megatron
  checkpoint (any TP/PP it was saved with: torch_dist reshards on load) or a Hugging Face folder
  (converted on the fly), and the tokenizer from the checkpoint's ``hf_assets``.
* :func:`local_generator` samples on this model-parallel group: :class:`MegatronGenerator` (the
  runner's ``Generator`` protocol) over the rollout engine :func:`~megatron_eaopd.rollout.factory.make_engine`
  picks (static on CPU, dynamic on GPU, recompute at PP > 1).
* :class:`DistributedGenerator` runs the runner on global rank 0 only (it writes the outputs and
  grades) while every other rank serves: rank 0 broadcasts each ``generate(prompts, n, seed)`` call,
  each data-parallel replica samples a contiguous share of the prompts, and rank 0 gathers the
  samples back in prompt order. ``close()`` releases the serving ranks.

Seeds: a call's samples are a deterministic function of (prompts, n, seed, DP size): each replica
reseeds its sampler with ``rollout.sampling_seed(seed, batch index, dp_rank)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_eaopd.checkpoint import META_FILE, read_checkpoint_metadata
from megatron_eaopd.distributed import init_world
from megatron_eaopd.evaluation.runner import Generator, Sample
from megatron_eaopd.models.sources import resolve_model_source as resolve_source
from megatron_eaopd.prompts import PromptFormat
from megatron_eaopd.rollout import RolloutParams, stop_token_ids
from megatron_eaopd.rollout.engine import RolloutEngine
from megatron_eaopd.rollout.factory import make_engine

__all__ = [
    "LoadedModel",
    "resolve_model_source",
    "training_prompt_format",
    "load_eval_model",
    "MegatronGenerator",
    "local_generator",
    "DistributedGenerator",
    "setup_eval_parallel",
]


@dataclass
class LoadedModel:
    """What :func:`load_eval_model` returns.

    Attributes: chunks (list with this rank's GPTModel), info (``ModelInfo``), tokenizer (HF
    tokenizer), assets_dir (str: folder with config/tokenizer), kind (``"megatron"`` or ``"hf"``),
    path (str: the resolved checkpoint ``iter_*`` folder or HF folder), iteration (int | None).
    """

    chunks: list
    info: Any
    tokenizer: Any
    assets_dir: str
    kind: str
    path: str
    iteration: int | None = None

    def stop_ids(self, chat_template: bool = False) -> tuple[int, ...]:
        """Every id that ends a response: the model config / generation_config EOS ids, the tokenizer's
        EOS and, with ``chat_template``, the template's end-of-turn (:func:`megatron_eaopd.rollout.stop_token_ids`)."""
        return stop_token_ids(self.tokenizer, self.info.eos_token_ids, chat_template)


def resolve_model_source(path: str | os.PathLike) -> tuple[str, Path, Path]:
    """Classify ``--model``: a Megatron checkpoint, a Hugging Face folder, or a cached hub id.

    Args: path: a checkpoint root (``latest`` + ``iter_*``), an ``iter_*`` folder, an HF folder, or a
        hub id present in the local Hugging Face cache.
    Returns: ``(kind, weights_path, assets_dir)``: kind ``"megatron"`` (weights_path = the resolved
        ``iter_*`` folder, assets_dir = its ``hf_assets``) or ``"hf"`` (both = the folder / snapshot).
    Raises: FileNotFoundError (:class:`~megatron_eaopd.models.sources.ModelSourceError`) naming the
        value and the fix: missing path or uncached hub id (names ``hf download``), a training run
        directory (names its ``checkpoints``), a folder that is not a model, a checkpoint without
        ``hf_assets``, an HF folder without weights.
    Source: :func:`megatron_eaopd.models.sources.resolve_model_source`.
    """
    src = resolve_source(path, key="--model", need="weights")
    return ("megatron" if src.is_megatron else "hf"), src.path, src.assets


def training_prompt_format(path: str | os.PathLike) -> PromptFormat | None:
    """The prompt format a training checkpoint was trained with, or None.

    Reads ``"prompt_format"`` from the checkpoint's ``eaopd_checkpoint.json`` (written by the
    trainer). None for a Hugging Face folder, a hub id, or a checkpoint without that key (e.g. one
    written by ``tools/convert_hf.py import``).
    Raises: FileNotFoundError as :func:`resolve_model_source`; ValueError when the stored format is
        malformed (names the file).
    """
    kind, weights, _ = resolve_model_source(path)
    if kind != "megatron":
        return None
    meta = read_checkpoint_metadata(weights)
    if "prompt_format" not in meta:
        return None
    return PromptFormat.from_dict(meta["prompt_format"], where=f"{Path(meta['path']) / META_FILE}: prompt_format")


def _default_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_eval_model(path: str | os.PathLike, params_dtype: torch.dtype | None = None,
                    progress: bool = False) -> LoadedModel:
    """Build this rank's model at the CURRENT TP/PP and load weights from ``path``.

    Call after :func:`setup_eval_parallel` (or any ``init_model_parallel``) on every rank.
    Args: path: Megatron checkpoint (any saved TP/PP; resharded on load) or HF folder (converted
        on the fly with ``build_gpt_model`` + ``load_hf_weights``); params_dtype: default bf16 on
        GPU, fp32 on CPU (reduced precision on CPU is promoted to fp32); progress: HF-load bar.
    Returns: :class:`LoadedModel` (model in eval mode).
    Raises: FileNotFoundError (see :func:`resolve_model_source`); RuntimeError: parallel state not
        initialised, or a checkpoint whose architecture/vocabulary differs from its hf_assets.
    Source: megatron_eaopd.models.provider / convert, megatron_eaopd.checkpoint.
    """
    from transformers import AutoTokenizer

    from megatron_eaopd.checkpoint import load_checkpoint
    from megatron_eaopd.models.convert import load_hf_weights
    from megatron_eaopd.models.provider import build_gpt_model

    kind, weights, assets = resolve_model_source(path)
    dt = params_dtype or _default_dtype()
    if not torch.cuda.is_available() and dt != torch.float32:
        dt = torch.float32  # the CPU layer trains/infers in fp32 only
    chunks, info = build_gpt_model(str(assets), params_dtype=dt, perform_initialization=False)
    iteration = None
    if kind == "megatron":
        iteration, _, _ = load_checkpoint(weights, chunks)
    else:
        load_hf_weights(chunks, weights, progress=progress)
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    for c in chunks:
        c.eval()
    tok = AutoTokenizer.from_pretrained(str(assets))
    return LoadedModel(chunks, info, tok, str(assets), kind, str(weights), iteration)


class MegatronGenerator:
    """Evaluation adaptor: the ``Generator`` protocol of ``megatron_eaopd.evaluation.runner``.

    ``generate(prompts, n, seed)`` renders each prompt text (optionally with the tokenizer's chat
    template), samples ``n`` responses with a rollout engine and returns, per prompt, ``n`` samples
    with ``text``, ``num_tokens`` (response tokens, stop token excluded) and ``truncated`` (hit
    ``max_new_tokens``).

    Args:
        engine: a :class:`~megatron_eaopd.rollout.engine.RolloutEngine` (it owns the stop ids).
        max_new_tokens, temperature, top_p: sampling settings (paper eval: 8192, 1.0, 0.8).
        chat_template: wrap each prompt as one user turn with the tokenizer's chat template.
        chat_template_kwargs: passed to ``apply_chat_template`` (e.g. ``enable_thinking=False``).
        batch_size: prompts per engine call (None = all).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        max_new_tokens: int = 8192,
        temperature: float = 1.0,
        top_p: float = 0.8,
        chat_template: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        batch_size: int | None = None,
    ):
        self.engine = engine
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.chat_template = chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_size = batch_size

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids (chat template applied when configured)."""
        tok = self.engine.hf_tokenizer
        if self.chat_template:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                **self.chat_template_kwargs,
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tok.encode(text, add_special_tokens=False))

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        """Sample ``n`` responses per prompt; returns ``[len(prompts)][n]`` Sample objects.

        Collective over the model's TP group. Deterministic for a given ``seed`` (the call index
        is the batch index within this call).
        """
        params = RolloutParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, n=n,
                               seed=seed)
        ids = [self.encode(p) for p in prompts]
        bs = self.batch_size or max(1, len(ids))
        out: list[list[Sample]] = []
        for ci, start in enumerate(range(0, len(ids), bs)):
            batch = self.engine.generate(ids[start : start + bs], params, call_index=ci)
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


def local_generator(chunks: list, tokenizer, *, stop_ids: Sequence[int], max_new_tokens: int = 8192,
                    temperature: float = 1.0, top_p: float = 0.8, engine: str = "auto",
                    max_batch_size: int | None = None, rollout_engine: Any = None,
                    kv_buffer_gb: float = 20.0) -> Generator:
    """A Generator that samples on THIS model-parallel group (collective over its TP/PP ranks).

    Prompts reach it as finished text (the runner applies the suffix and any chat template), so the
    adaptor only tokenises them (no special tokens added).
    Args: chunks: model chunks at the current TP/PP (wrapped or not); tokenizer: HF tokenizer;
        stop_ids: ids that end a response (:func:`megatron_eaopd.rollout.stop_token_ids`);
        max_new_tokens, temperature, top_p: sampling (paper: 8192, 1.0, 0.8); engine: ``auto`` |
        ``static`` | ``dynamic`` | ``recompute`` (:func:`megatron_eaopd.rollout.factory.make_engine`);
        max_batch_size: sequences per engine batch (default: all rows of a call); rollout_engine:
        reuse an existing engine on the same model (e.g. the trainer's) instead of building one;
        kv_buffer_gb: dynamic engine buffer.
    Returns: a :class:`MegatronGenerator`.
    Raises: ValueError for bad sampling settings (on first use) or an engine that cannot run here.
    """
    if rollout_engine is None:
        rollout_engine = make_engine(list(chunks), tokenizer, stop_ids=stop_ids, kind=engine,
                                     max_batch_size=max_batch_size, kv_buffer_gb=kv_buffer_gb)
    return MegatronGenerator(rollout_engine, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             chat_template=False)


def _split(n_items: int, parts: int, idx: int) -> tuple[int, int]:
    """Contiguous share ``[start, end)`` of ``n_items`` for part ``idx`` of ``parts`` (sizes differ by <= 1)."""
    base, extra = divmod(n_items, parts)
    start = idx * base + min(idx, extra)
    return start, start + base + (1 if idx < extra else 0)


class DistributedGenerator:
    """Spreads ``generate`` calls over the data-parallel replicas; rank 0 leads, the others serve.

    Usage (every rank)::

        gen = DistributedGenerator(local_generator(chunks, tok, ...))
        if dist.get_rank() == 0:
            try:
                run_evaluation(gen, ...)
            finally:
                gen.close()
        else:
            gen.serve()

    Args: local: the per-model-parallel-group Generator (see :func:`local_generator`).
    In a world of one (or without torch.distributed) it just forwards to ``local``.
    Errors: an exception on a serving rank is sent back and re-raised on rank 0 as RuntimeError
        (naming the rank); ``generate`` on a rank other than 0 raises RuntimeError.
    """

    def __init__(self, local: Generator):
        self.local = local
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._closed = False

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _dp() -> tuple[int, int, bool]:
        from megatron.core import parallel_state as ps

        rep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), rep

    def _bcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _step(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]] | None:
        """One collective generate step on every rank; returns the gathered samples on rank 0."""
        dp_rank, dp, rep = self._dp()
        s, e = _split(len(prompts), dp, dp_rank)
        mine: Any = []
        err = None
        if e > s:
            try:
                mine = self.local.generate(prompts[s:e], n, seed)
            except Exception as ex:  # noqa: BLE001 - reported to rank 0
                err = f"rank {dist.get_rank()}: {type(ex).__name__}: {ex}"
        payload = (dp_rank, rep, s, mine, err)
        gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        errs = [g[4] for g in gathered if g[4]]
        if errs:
            raise RuntimeError("generation failed: " + "; ".join(errs))
        out: list[Any] = [None] * len(prompts)
        for _, is_rep, start, samples, _ in gathered:
            if is_rep:
                for i, g in enumerate(samples):
                    out[start + i] = g
        missing = [i for i, g in enumerate(out) if g is None]
        if missing:
            raise RuntimeError(f"no samples came back for prompts {missing[:5]}")
        return out

    # ---- Generator protocol ------------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        """See ``Generator``; on rank 0 (collective: the serving ranks take part)."""
        if not self.distributed:
            return self.local.generate(prompts, n, seed)
        if dist.get_rank() != 0:
            raise RuntimeError("DistributedGenerator.generate is called on rank 0 only; other ranks call serve()")
        self._bcast(("generate", list(prompts), int(n), int(seed)))
        return self._step(list(prompts), n, seed)  # type: ignore[return-value]

    def serve(self) -> None:
        """On ranks other than 0: take part in rank 0's generate calls until it calls ``close``."""
        if not self.distributed:
            return
        while True:
            msg = self._bcast(None)
            if msg is None or msg[0] == "stop":
                return
            _, prompts, n, seed = msg
            self._step(prompts, n, seed)

    def close(self) -> None:
        """On rank 0: release the serving ranks (idempotent; no-op in a world of one)."""
        if self.distributed and not self._closed and dist.get_rank() == 0:
            self._bcast(("stop",))
        self._closed = True


def setup_eval_parallel(tp: int = 1, pp: int = 1, seed: int = 0) -> int:
    """Initialise torch.distributed (a world of one on a free port without a launcher) and Megatron TP/PP.

    Args: tp, pp: model-parallel sizes (DP = world / (tp*pp)); seed: model RNG seed.
    Returns: the world size.
    Raises: ValueError when tp or pp < 1 or tp*pp does not divide the world (names the torchrun fix).
    Source: :func:`megatron_eaopd.distributed.init_world`.
    """
    return init_world(tp, pp, seed)
