"""Choosing the next token of every row of a batch, each row with its own settings and generator.

Sampling is Gumbel-max with one torch.Generator per row, so a sample depends only on its own seed
and logits, not on which other requests shared its batch. The order of the logit processors is
transformers': repetition penalty, temperature, top-k, top-p.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ilf.sampling import Sampling


class SamplingRow(Protocol):
    settings: Sampling
    generator: torch.Generator
    prompt_ids: list[int]

    @property
    def token_ids(self) -> list[int]: ...


def choose_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-probability (after the processors) for every row of logits [rows, vocab]."""
    penalised = [(i, row) for i, row in enumerate(rows) if row.settings.repetition_penalty != 1.0]
    if penalised:
        logits = logits.clone()
    for i, row in penalised:
        penalty = row.settings.repetition_penalty
        seen = torch.tensor(row.prompt_ids + row.token_ids, device=logits.device)
        scores = logits[i, seen]
        logits[i, seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    temperatures = torch.tensor([row.settings.temperature or 1.0 for row in rows], device=logits.device)
    scaled = logits / temperatures[:, None]
    if any(row.settings.top_k or row.settings.top_p < 1.0 for row in rows):
        scaled = top_k_top_p(scaled, [row.settings for row in rows])
    logprobs = torch.log_softmax(scaled, dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.settings.temperature > 0]
    # Every pass over [rows, vocab] counts (49,152 columns for SmolLM2): greedy rows need the argmax only, and
    # when every row samples, the noise is added in place to the log-probabilities' rows without a gather.
    tokens = logprobs.argmax(dim=-1) if len(sampled) < len(rows) else None
    if sampled:
        # Each row draws from its own generator into one buffer; the Gumbel transform then runs once for all.
        noise = torch.empty(len(sampled), logits.shape[1], device=logits.device)
        for j, i in enumerate(sampled):
            torch.rand(logits.shape[1], generator=rows[i].generator, device=logits.device, out=noise[j])
        gumbel = noise.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()
        if tokens is None:
            tokens = gumbel.add_(logprobs).argmax(dim=-1)
        else:
            index = torch.tensor(sampled, device=logits.device)
            tokens[index] = gumbel.add_(logprobs[index]).argmax(dim=-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def top_k_top_p(scaled: torch.Tensor, settings: Sequence[Sampling]) -> torch.Tensor:
    """Sets to -inf every logit outside its row's top-k and top-p (the most likely token always stays)."""
    values, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(values.shape[1], device=values.device)
    top_k = torch.tensor([s.top_k or values.shape[1] for s in settings], device=values.device)
    values = values.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = torch.tensor([s.top_p for s in settings], device=values.device)
    values = values.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, values)
