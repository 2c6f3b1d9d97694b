"""The recompute engine: sampling through any TP/PP layout with one full forward per new token (no KV cache).

The pipeline-parallel path (the KV-cache engines here are PP = 1): every step runs the current
prefixes through Megatron's pipeline schedule (:func:`megatron_eaopd.pipeline.forward_only`); the last
stage gathers the vocab-parallel logits of each row's last position across TP, applies temperature
and top-p, samples with a generator seeded per call, and broadcasts the tokens to the other stages.
Cost is O(S^2) per sequence: meant for PP > 1 students of modest size and for tests; production
rollouts should use a PP = 1 layout (dynamic engine).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_eaopd.pipeline import MicroBatch, forward_only, padded_length
from megatron_eaopd.rollout.engine import EngineBase
from megatron_eaopd.rollout.params import RolloutParams

__all__ = ["RecomputeEngine", "top_p_filter"]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose mass reaches ``top_p`` (nucleus).

    Args:
        probs: ``[B, V]`` probabilities (rows sum to 1).
        top_p: in (0, 1]; 1.0 returns ``probs`` unchanged.
    Returns:
        ``[B, V]`` unnormalised probabilities with the tail set to 0 (``torch.multinomial`` normalises).
    Source: Holtzman et al. 2020; the same rule as megatron-core's ``TorchSampling`` top-p filter.
    """
    if top_p >= 1.0:
        return probs
    sp, si = probs.sort(dim=-1, descending=True)
    drop = sp.cumsum(-1) - sp > top_p
    sp = sp.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, si, sp)


class RecomputeEngine(EngineBase):
    """Sampling by full recomputation, any TP/PP (see the module docstring).

    Args: see :class:`~megatron_eaopd.rollout.engine.EngineBase`. Log-probs are not returned
    (``logprob_mask`` all False); the trainer recomputes old log-probs with its own forward.
    """

    kind = "recompute"

    @torch.no_grad()
    def _sample(self, rows, params: RolloutParams, seed: int, return_log_probs: bool):
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        tp = ps.get_tensor_model_parallel_world_size()
        mult = tp if getattr(self.model.config, "sequence_parallel", False) else 1
        b = len(rows)
        cur = torch.tensor([len(r) for r in rows])
        total = padded_length(int(cur.max()) + params.max_new_tokens, mult)
        pad = self.stop_ids[0]
        tokens = torch.full((b, total), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        gen = torch.Generator().manual_seed(seed)
        responses: list[list[int]] = [[] for _ in rows]
        hit: list[int | None] = [None] * b
        for _ in range(params.max_new_tokens):
            s = padded_length(int(cur.max()), mult)
            mb = MicroBatch(0, slice(0, b), tokens[:, :s].to(dev), torch.arange(s).expand(b, s).contiguous().to(dev),
                            tokens[:, 1: s + 1].to(dev), torch.zeros(b, s, dtype=torch.bool, device=dev))
            nxt = torch.zeros(b, dtype=torch.long, device=dev)

            def on_logits(_mb, logits):
                last = logits[torch.arange(b, device=logits.device), (cur - 1).to(logits.device)].float()
                full = gather_from_tensor_model_parallel_region(last) if tp > 1 else last
                probs = top_p_filter(torch.softmax(full / params.temperature, dim=-1).cpu(), params.top_p)
                nxt.copy_(torch.multinomial(probs, 1, generator=gen)[:, 0].to(nxt.device))

            forward_only(self.chunks, [mb], on_logits)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
            nxt = nxt.cpu()
            for i in range(b):
                if hit[i] is not None or len(responses[i]) >= params.max_new_tokens:
                    continue
                t = int(nxt[i])
                if t in self.stop_ids:
                    hit[i] = t
                    continue
                responses[i].append(t)
                tokens[i, int(cur[i])] = t
                cur[i] += 1
            if all(hit[i] is not None or len(responses[i]) >= params.max_new_tokens for i in range(b)):
                break
        return responses, [None] * b, [h is not None for h in hit], hit
