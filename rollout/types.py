"""What a caller asks for (``SamplingParams``) and what it gets back (``Rollout``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from rollout.routed_experts import RoutedExperts

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature=0`` is greedy; ``top_k=-1`` disables top-k."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {list(stops)!r}")
        object.__setattr__(self, "stop_token_ids", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One finished sequence. ``routed_experts`` covers ``prompt + output - 1`` tokens from ``routed_experts.start``.

    ``weight_version`` is the version of the weights that sampled it (``Engine.update_weights``;
    SGLang's ``meta_info.weight_version``); a rollout that continued across an update carries the
    newest, and ``output_weight_versions`` the version that sampled each output token. ``None``:
    the engine did not say.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str
    routed_experts: RoutedExperts | None = None
    meta: dict = field(default_factory=dict)
    weight_version: int | str | None = None
    output_weight_versions: list[int | str] | None = None

    @property
    def token_ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
