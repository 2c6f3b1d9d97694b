"""The rollout batch: sampled sequences with their masks, aligned to what the logits predict.

Layout of a :class:`RolloutBatch` (B = prompts x n rows, prompt-major: rows ``i*n .. i*n+n-1`` are
prompt ``i``'s samples; S = longest prompt + response in the batch)::

    tokens        [B, S]    int64   prompt | response (| stop token) | pad ...
    targets_*     [B, S-1]          row [b, s] describes tokens[b, s+1], the token that the
                                    logits at [b, s] predict (inputs = tokens[:, :-1])
    loss_mask     [B, S-1]  bool    True where tokens[b, s+1] is a response token (incl. the stop token)
    raw_logprobs  [B, S-1]  float32 engine log-prob of tokens[b, s+1] where logprob_mask, else 0
    logprob_mask  [B, S-1]  bool    True where the engine returned that log-prob

A response that stopped ends with exactly one stop token (``finished=True``) so the policy learns to
stop; a response cut by ``max_new_tokens`` has none (``finished=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from megatron_eaopd.pipeline import MicroBatch, split_micro_batches

__all__ = ["RolloutBatch", "assemble_batch"]


@dataclass
class RolloutBatch:
    """Sampled sequences, right-padded; see the module docstring for the exact layout.

    Attributes (B rows, S = max total length):
        tokens: [B, S] int64, prompt + response (+ its stop token if finished) + ``pad_id`` padding.
        prompt_lengths: [B] int64, prompt tokens per row.
        response_lengths: [B] int64, response tokens per row, including the stop token.
        loss_mask: [B, S-1] bool, True where ``tokens[:, s+1]`` is a response token.
        raw_logprobs: [B, S-1] float32, the engine's T=1, unfiltered log-prob of ``tokens[:, s+1]``
            (nats), 0 where ``logprob_mask`` is False. Not the sampling distribution's log-prob
            unless temperature = 1 and top_p = 1.
        logprob_mask: [B, S-1] bool, where ``raw_logprobs`` holds an engine value (response
            tokens; not a stop token the engine did not return; all False when log-probs were not
            requested).
        finished: [B] bool, True = stopped at a stop id, False = hit ``max_new_tokens``.
        prompt_index: [B] int64, index of the row's prompt in the input list.
        response_texts: decoded responses (EOS and special tokens skipped).
        pad_id: id used for padding (the first stop id).
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
        """Response ids of row ``b`` (including the stop token if finished)."""
        p, r = int(self.prompt_lengths[b]), int(self.response_lengths[b])
        return self.tokens[b, p : p + r].tolist()

    def micro_batches(self, micro_batch_size: int, device: torch.device | str = "cpu",
                      seq_multiple: int = 1) -> list[MicroBatch]:
        """This batch's rows as model-ready micro-batches (``inputs``, ``targets``, ``position_ids``,
        ``loss_mask`` sliced from the batch, not rebuilt), padded with ``pad_id`` to a sequence length
        that is a multiple of ``seq_multiple``; see :func:`megatron_eaopd.pipeline.split_micro_batches`.
        """
        return split_micro_batches(self.tokens, self.loss_mask, micro_batch_size, device=device,
                                   seq_multiple=seq_multiple, pad_id=self.pad_id)


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
    stop_tokens: Sequence[int | None] | None = None,
) -> RolloutBatch:
    """Build a :class:`RolloutBatch` from per-row engine outputs (pure tensor bookkeeping).

    Args:
        prompts: B prompt id lists (may differ in length; each >= 1 token).
        responses: B generated id lists as the engine returned them (static engine: without the
            EOS; dynamic engine: with it).
        logprobs: B lists of raw log-probs, one per entry of ``responses`` (or None).
        engine_stopped: B flags, True when the engine stopped the row at a stop token that it did not
            return (static engine: ``len(response) < max_new_tokens``).
        eos_ids: stop ids, the first is used for padding (>= 1 id).
        max_new_tokens: response budget (EOS not counted).
        prompt_index: B prompt indices (default ``range(B)``).
        decode: ``ids -> str`` for ``response_texts`` (default: no texts).
        seed: recorded in the batch.
        stop_tokens: for rows with ``engine_stopped``, the stop id the engine ended on (appended to the
            response); None entries (or no list) append ``eos_ids[0]``.
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
    if stop_tokens is not None and len(stop_tokens) != bsz:
        raise ValueError(f"{len(stop_tokens)} stop tokens for {bsz} rows")
    rows = []
    for b_i, (p, r, lp, stopped) in enumerate(zip(prompts, responses, logprobs, engine_stopped)):
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
        elif stopped:  # static engine: stopped at a stop id without returning it
            hit = stop_tokens[b_i] if stop_tokens is not None and stop_tokens[b_i] is not None else eos0
            r_tokens, has_lp = r + [int(hit)], [lp is not None] * len(r) + [False]
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
