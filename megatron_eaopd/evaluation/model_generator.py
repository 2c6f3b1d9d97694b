"""Model-backed generation for the evaluation runner: load a model, sample through any TP/PP/DP layout.

Pieces (all follow the ``Generator`` protocol of :mod:`megatron_eaopd.evaluation.runner`):

* :func:`load_eval_model` builds this rank's ``GPTModel`` at the current TP/PP from a Megatron
  checkpoint (any TP/PP it was saved with: torch_dist reshards on load) or a Hugging Face folder
  (converted on the fly), and the tokenizer from the checkpoint's ``hf_assets``.
* :func:`local_generator` samples on this model-parallel group: :class:`~megatron_eaopd.rollout.
  MegatronGenerator` over a :class:`~megatron_eaopd.rollout.Rollout` (static engine on CPU, dynamic
  on GPU) at PP = 1, or the same adaptor over :func:`~megatron_eaopd.rollout.sample_with_recompute`
  at PP > 1.
* :class:`DistributedGenerator` runs the runner on global rank 0 only (it writes the outputs and
  grades) while every other rank serves: rank 0 broadcasts each ``generate(prompts, n, seed)`` call,
  each data-parallel replica samples a contiguous share of the prompts, and rank 0 gathers the
  samples back in prompt order. ``close()`` releases the serving ranks.

Seeds: a call's samples are a deterministic function of (prompts, n, seed, DP size): each replica
reseeds its sampler with ``rollout.sampling_seed(seed, batch index, dp_rank)``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_eaopd.checkpoint import META_FILE, read_checkpoint_metadata
from megatron_eaopd.evaluation.runner import Generator, Sample
from megatron_eaopd.models.sources import resolve_model_source as resolve_source
from megatron_eaopd.prompts import PromptFormat

__all__ = [
    "LoadedModel",
    "resolve_model_source",
    "training_prompt_format",
    "load_eval_model",
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

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids from the model config / generation_config, else the tokenizer's EOS."""
        ids = tuple(self.info.eos_token_ids)
        if not ids and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids = (int(self.tokenizer.eos_token_id),)
        return ids


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


class _RecomputeRollout:
    """Rollout-shaped adaptor over :func:`~megatron_eaopd.rollout.sample_with_recompute` (any TP/PP)."""

    def __init__(self, chunks: list, tokenizer):
        self.chunks = chunks
        self.hf_tokenizer = tokenizer

    def generate(self, prompts, params, call_index=None):
        from megatron_eaopd.rollout import sample_with_recompute

        return sample_with_recompute(self.chunks, self.hf_tokenizer, prompts, params, call_index=call_index or 0)


def local_generator(chunks: list, tokenizer, *, max_new_tokens: int = 8192, temperature: float = 1.0,
                    top_p: float = 0.8, eos_ids: Sequence[int] = (), engine: str = "auto",
                    max_batch_size: int | None = None, rollout: Any = None,
                    kv_buffer_gb: float = 20.0) -> Generator:
    """A Generator that samples on THIS model-parallel group (collective over its TP/PP ranks).

    Prompts reach it as finished text (the runner applies the suffix and any chat template), so the
    adaptor only tokenises them (no special tokens added).
    Args: chunks: model chunks at the current TP/PP (wrapped or not); tokenizer: HF tokenizer;
        max_new_tokens, temperature, top_p: sampling (paper: 8192, 1.0, 0.8); eos_ids: stop ids
        (first = the engine's stop id; default the tokenizer's EOS); engine: ``auto`` | ``static`` |
        ``dynamic`` (PP = 1); max_batch_size: sequences per engine batch (default: all rows of a
        call); rollout: reuse an existing :class:`~megatron_eaopd.rollout.Rollout` on the same model
        (e.g. the trainer's) instead of building a new engine; kv_buffer_gb: dynamic engine buffer.
    Returns: a :class:`~megatron_eaopd.rollout.MegatronGenerator`.
    Raises: ValueError for bad sampling settings (on first use) or an unknown engine.
    Source: megatron_eaopd.rollout (Rollout at PP = 1, sample_with_recompute at PP > 1).
    """
    from megatron.core import parallel_state as ps

    from megatron_eaopd.models.provider import unwrap
    from megatron_eaopd.rollout import MegatronGenerator, Rollout

    if rollout is None:
        if ps.get_pipeline_model_parallel_world_size() > 1:
            rollout = _RecomputeRollout(list(chunks), tokenizer)
        else:
            rollout = Rollout(unwrap(chunks[0]), tokenizer, engine=engine, max_batch_size=max_batch_size,
                              dynamic_buffer_size_gb=kv_buffer_gb)
    return MegatronGenerator(rollout, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             chat_template=False, eos_ids=tuple(eos_ids))


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
    """Initialise torch.distributed (a world of one without a launcher) and Megatron TP/PP.

    Args: tp, pp: model-parallel sizes (DP = world / (tp*pp)); seed: model RNG seed.
    Returns: the world size.
    Raises: ValueError when tp or pp < 1 or tp*pp does not divide the world (names the torchrun fix).
    """
    from megatron_eaopd.distributed import dist_env, init_distributed, init_model_parallel, seed_everything

    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got tp={tp}, pp={pp}")
    world = dist.get_world_size() if dist.is_initialized() else dist_env().world_size
    if world % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the world size {world}; launch with "
                         f"torchrun --nproc-per-node {tp * pp} (or a multiple of it: the rest is data parallel)")
    if not dist.is_initialized() and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ \
            and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a world of one: any free port
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    init_distributed()
    init_model_parallel(tp, pp)
    seed_everything(seed)
    return dist.get_world_size()
