"""Tokenised examples with the loss on the completion + EOS only, batched by length.

Sequences are never padded to the longest of the dataset: each optimizer step's examples are
sorted by length and cut into micro-batches under a token budget, so a micro-batch pads only to
its own (similar) longest member.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def completion_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def tokenize(tokenizer, records: list[dict], max_seq_len: int) -> tuple[list[Example], int]:
    """Examples that keep at least one completion token, and how many records were dropped.

    Prompt and completion are tokenised separately, as at inference time the model continues the
    prompt's own tokens; the completion ends with EOS so the model learns to stop.
    """
    examples, dropped = [], 0
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (prompt + completion)[:max_seq_len]
        labels = ([IGNORE] * len(prompt) + completion)[:max_seq_len]
        example = Example(input_ids, labels)
        if example.completion_tokens == 0:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def epoch_steps(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """The epoch's optimizer steps: a seeded shuffle cut into groups of batch_size examples.

    Deterministic in (seed, epoch), so a resumed run sees the same order and skips done steps.
    """
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [[examples[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


def micro_batches(step: list[Example], token_budget: int) -> list[list[Example]]:
    """The step's examples sorted by length, cut so that rows x longest row stays within the budget."""
    batches, current = [], []
    for example in sorted(step, key=lambda e: len(e.input_ids)):
        longest = len(example.input_ids)  # sorted ascending: the newcomer is the longest
        if current and (len(current) + 1) * longest > token_budget:
            batches.append(current)
            current = []
        current.append(example)
    if current:
        batches.append(current)
    return batches


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
