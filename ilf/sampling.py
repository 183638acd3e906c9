"""Sampling settings as plain data, and the one conversion from and to the contract's SamplingParams.

Every service and protocol applies the same defaults to unset fields (proto3 reads an unset number as 0):
n 1, temperature 0 (greedy), top_p 1, top_k off, max_new_tokens DEFAULT_MAX_NEW_TOKENS, repetition_penalty 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from ilf.v1 import common_pb2

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request, after defaults are applied."""
    n: int = 1
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: disabled
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    seed: int | None = None           # sample i uses seed + i, so n=1 requests can reproduce any sample

    def sample_seed(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index

    @classmethod
    def from_proto(cls, params: common_pb2.SamplingParams, *, stop: tuple[str, ...] = (),
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> "Sampling":
        """Unset fields take the documented defaults; `stop` is added to the request's own stop sequences."""
        return cls(n=params.n or 1, temperature=params.temperature, top_p=params.top_p or 1.0, top_k=params.top_k,
                   max_new_tokens=params.max_new_tokens or max_new_tokens,
                   stop=tuple(dict.fromkeys([*params.stop, *stop])),
                   repetition_penalty=params.repetition_penalty or 1.0,
                   seed=params.seed if params.HasField("seed") else None)

    def to_proto(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                         max_new_tokens=self.max_new_tokens, stop=list(self.stop),
                                         repetition_penalty=self.repetition_penalty, seed=self.seed)
