"""Choosing the next token of every row of a batch, each row with its own settings and generator.

Sampling inverts each row's cumulative distribution at one uniform number drawn from the row's own
torch.Generator, so a sample depends only on its own seed and logits, not on which other requests
shared its batch. (Gumbel-max, used before, drew a number per vocabulary entry: 30 rows x 49,152
draws and two logarithms over them took 25 of a 129 ms bf16 decode step on SmolLM2, measured.)
The order of the logit processors is transformers': repetition penalty, temperature, top-k, top-p.
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
    # Every pass over [rows, vocab] counts (49,152 columns for SmolLM2): one for the maximum, one for the
    # exponentials, one for their block sums; greedy rows need the argmax only.
    maximum = scaled.amax(dim=-1, keepdim=True)
    sampled = [i for i, row in enumerate(rows) if row.settings.temperature > 0]
    every = len(sampled) == len(rows)
    if not every:
        tokens, log_total = scaled.argmax(dim=-1), _log_total(scaled - maximum)
    if sampled:
        # when every row samples, the sampled rows are the batch: no gather
        index = None if every else torch.tensor(sampled, device=logits.device)
        weights = (scaled - maximum if every else scaled[index] - maximum[index]).exp_()
        uniform = torch.cat([torch.rand(1, generator=rows[i].generator, device=logits.device) for i in sampled])
        picked, totals = _invert(weights, uniform)
        # rounding can land on a token of weight 0 (one cut by top-k/top-p) at the end of the row: never sample
        # one; take the most likely token instead
        impossible = weights.gather(1, picked[:, None])[:, 0] == 0
        if bool(impossible.any()):
            picked = torch.where(impossible, weights.argmax(dim=-1), picked)
        if every:
            tokens, log_total = picked, totals.log()
        else:
            tokens[index], log_total[index] = picked, totals.log()
    return tokens, scaled.gather(1, tokens[:, None])[:, 0] - maximum[:, 0] - log_total


def _log_total(shifted: torch.Tensor) -> torch.Tensor:
    """log sum exp of rows already shifted by their maximum."""
    return shifted.exp_().sum(dim=-1).log_()


# Rows are inverted block by block: the blocks' sums locate the block holding the drawn mass, and only that block
# is summed token by token. A running sum over the whole row (cumsum) took as long as the exponentials themselves.
INVERSION_BLOCK = 1024


def _invert(weights: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of unnormalised weights [rows, vocab] and one uniform number per row: the token whose cumulative
    weight first exceeds uniform x the row's total, and the totals."""
    rows, vocab = weights.shape
    blocks = -(-vocab // INVERSION_BLOCK)
    padded = weights if blocks * INVERSION_BLOCK == vocab else \
        torch.nn.functional.pad(weights, (0, blocks * INVERSION_BLOCK - vocab))
    block_mass = padded.view(rows, blocks, INVERSION_BLOCK).sum(dim=-1).cumsum_(dim=-1)
    totals = block_mass[:, -1]
    target = uniform * totals
    block = torch.searchsorted(block_mass, target[:, None], right=True)[:, 0].clamp_(max=blocks - 1)
    before = torch.where(block > 0, block_mass.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    columns = block[:, None] * INVERSION_BLOCK + torch.arange(INVERSION_BLOCK, device=weights.device)
    within = padded.gather(1, columns).cumsum_(dim=-1)
    # the block's own running sum can end a rounding error short of its sum: stay inside the block
    offset = torch.searchsorted(within, (target - before)[:, None], right=True)[:, 0].clamp_(max=INVERSION_BLOCK - 1)
    return (block * INVERSION_BLOCK + offset).clamp_(max=vocab - 1), totals


# The most likely tokens looked at first for top-k and top-p, fewer first: a row whose cut lies among them
# (top-k up to that many, or a top-p mass they reach) needs no sort of the whole vocabulary. At T=0.8 and
# top_p 0.95 SmolLM2's rows nearly always settle among the first 1,024 (measured: all 10,745 of 3 MBPP prompts x
# 30 samples). Sorting all 49,152 logits of 30 rows took 66 ms, more than the decode step's 40 layers; the top
# 64 take 1.6 ms and the top 1,024 8 ms (2 cores). Rows that no candidate count settles are sorted whole.
CANDIDATES = (64, 1024)


def top_k_top_p(scaled: torch.Tensor, settings: Sequence[Sampling]) -> torch.Tensor:
    """Sets to -inf every logit outside its row's top-k and top-p (the most likely token always stays)."""
    vocab = scaled.shape[1]
    top_k = torch.tensor([s.top_k or vocab for s in settings], device=scaled.device)
    top_p = torch.tensor([s.top_p for s in settings], device=scaled.device)
    uncut = (top_k >= vocab) & (top_p >= 1.0)   # a row of a batch whose other rows cut
    whole_normaliser = torch.logsumexp(scaled, dim=-1)
    # the first count sees every row as they are (no gather of [rows, vocab]); later ones only the rows left
    rows, part, kept = torch.arange(len(settings), device=scaled.device), scaled, None
    for count in CANDIDATES:
        settled, values, order = _cut_among(part, top_k[rows], top_p[rows], whole_normaliser[rows], min(count, vocab))
        block = torch.full_like(part, float("-inf")).scatter_(1, order, values)
        if kept is None:
            kept = block   # every row; the unsettled ones are written again below
        else:
            kept[rows[settled]] = block[settled]
        rows = rows[~settled & ~uncut[rows]]
        if not len(rows):
            break
        part = scaled[rows]
    else:
        kept[rows] = _sorted_top_k_top_p(scaled[rows], top_k[rows], top_p[rows])
    if bool(uncut.any()):
        kept[uncut] = scaled[uncut]
    return kept


def _cut_among(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, whole_normaliser: torch.Tensor,
               count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cut within each row's `count` most likely tokens: (settled rows, their kept values (-inf for the
    cut ones), their token ids)."""
    values, order = scaled.topk(count, dim=-1)
    ranks = torch.arange(count, device=scaled.device)
    values = values.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    # top-p works on the distribution top-k left: the candidates' when top-k cut among them, the whole row's when
    # top-k is off; a top-k beyond the candidates leaves a distribution they cannot normalise, so such a row waits
    within, whole = top_k <= count, top_k >= scaled.shape[1]
    normaliser = torch.where(within, torch.logsumexp(values, dim=-1), whole_normaliser)
    probs = (values - normaliser[:, None]).exp()
    mass = probs.cumsum(dim=-1)
    values = values.masked_fill(mass - probs >= top_p[:, None], float("-inf"))
    # the first token after the candidates has their whole mass before it: it is cut only when that reaches top_p
    return within | (whole & (mass[:, -1] >= top_p)), values, order


def _sorted_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    values, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(values.shape[1], device=values.device)
    values = values.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    values = values.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, values)
