"""The sampler alone: greedy, seeded inverse-CDF sampling per row, and the logit processors in transformers' order."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ilf.sampling import Sampling
from services.generation.sampler import choose_tokens, top_k_top_p


@dataclass
class Row:
    settings: Sampling
    seed: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)


def test_greedy_takes_the_argmax_and_reports_its_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    tokens, logprobs = choose_tokens(logits, [Row(Sampling()), Row(Sampling())])
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    settings = Sampling(temperature=1.0)
    alone = [int(choose_tokens(logits[2:3], [Row(settings, seed=5)])[0]) for _ in range(2)]
    together = choose_tokens(logits[[0, 2, 3]], [Row(Sampling()), Row(settings, seed=5), Row(settings, seed=9)])[0]
    assert alone[0] == alone[1] == int(together[1])


def test_samples_follow_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    settings = Sampling(temperature=0.5)
    rows = [Row(settings, seed=s) for s in range(4000)]
    tokens, _ = choose_tokens(logits.expand(len(rows), -1), rows)
    frequencies = torch.bincount(tokens, minlength=4) / len(rows)
    assert torch.allclose(frequencies, torch.softmax(logits[0] / 0.5, -1), atol=0.03)


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    kept = top_k_top_p(logits, [Sampling(top_k=2), Sampling(top_p=0.01), Sampling(top_k=3, top_p=0.9)])
    assert torch.isfinite(kept).tolist() == [[True, True, False, False], [True, False, False, False],
                                              [True, True, False, False]]
    rows = [Row(Sampling(temperature=5.0, top_k=1), seed=s) for s in range(20)]
    assert set(choose_tokens(logits[:1].expand(20, -1), rows)[0].tolist()) == {0}


def test_the_candidate_cut_keeps_what_sorting_the_whole_vocabulary_keeps():
    """top-k/top-p look at the 64, then the 1,024 most likely tokens first; rows they cannot settle are sorted
    whole."""
    from services.generation.sampler import _sorted_top_k_top_p
    torch.manual_seed(3)
    vocab = 49_152
    peaked = torch.randn(4, vocab) * 4            # top_p 0.95 falls among the candidates
    flat = torch.randn(2, vocab) * 0.1            # it does not: sorted whole
    logits = torch.cat([peaked, flat, peaked[:1]])
    # the last row: top-p over the 300 tokens top-k leaves, not over the whole row
    settings = [Sampling(top_p=0.95), Sampling(top_k=50), Sampling(top_k=3 * 1024), Sampling(),
                Sampling(top_p=0.95), Sampling(top_k=20, top_p=0.5), Sampling(top_k=300, top_p=0.6)]
    kept = top_k_top_p(logits, settings)
    top_k = torch.tensor([s.top_k or vocab for s in settings])
    expected = _sorted_top_k_top_p(logits, top_k, torch.tensor([s.top_p for s in settings]))
    cut = [0, 1, 2, 4, 5, 6]   # row 3 cuts nothing; sorted, its float32 running mass reached 1 early and cut a tail
    assert torch.equal(torch.isfinite(kept[cut]), torch.isfinite(expected[cut]))
    assert torch.equal(kept[cut][torch.isfinite(kept[cut])], expected[cut][torch.isfinite(expected[cut])])
    counts = torch.isfinite(kept).sum(dim=-1).tolist()
    assert counts[1] == 50 and counts[2] == 3 * 1024 and counts[3] == vocab and counts[5] <= 20
    assert 0 < counts[0] < 1024 and counts[4] > 1024   # one settled by the candidates, one sorted
    assert counts[6] < counts[0] and counts[6] <= 300


def test_repetition_penalty_applies_to_prompt_and_generated_tokens():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    assert int(choose_tokens(logits, [Row(Sampling(repetition_penalty=2.0), prompt_ids=[0])])[0]) == 1
    assert int(choose_tokens(logits, [Row(Sampling(repetition_penalty=2.0), prompt_ids=[0], token_ids=[1])])[0]) == 0
    # a negative logit is multiplied, so it falls further
    negative = torch.tensor([[-1.0, -1.2]])
    assert int(choose_tokens(negative, [Row(Sampling(repetition_penalty=2.0), token_ids=[0])])[0]) == 1
