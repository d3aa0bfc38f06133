"""What a caller asks for (``SamplingParams``) and what it gets back (``Rollout``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from rollout.routed_experts import RoutedExperts

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"
ERROR_META_KEY = "error"  # Rollout.meta key: why a request that finished with FINISH_ABORT failed in the engine

# Bounds of what the engine's kernels take; a request outside them is refused by name before it is queued.
MAX_SEED = 2**63 - 1  # seeds travel as int64; the sampler hashes their low and high 32-bit words
MAX_INT32 = 2**31 - 1  # token ids, top_k and max_new_tokens travel as int32-sized values
MIN_TEMPERATURE = 1e-5  # below this, logits / T leave float32's range (0 itself means greedy)
MAX_TEMPERATURE = 100.0  # above this, sampling is uniform noise for any real model
MIN_TOP_P = 1e-6  # smaller values round to 0 in float32 and would drop even the top token


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an ``int`` in ``[low, high]``; bools, floats and anything else are refused by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    value = int(value)
    return value


def _real(name: str, value: Any) -> float:
    """``value`` as a finite ``float``; bools, NaN, infinities and ints too large for a float are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an integer of {int(value).bit_length()} bits") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {out!r}")
    return out


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature=0`` is greedy; ``top_k=-1`` disables top-k.

    Every field is checked against what the sampler and its kernels take (``MAX_SEED``,
    ``MAX_INT32``, the temperature and top-p ranges), so a value that would overflow or
    lose meaning on the device is a ``ValueError`` naming the field, raised here.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        """Normalise every field to a plain ``int``/``float`` inside the kernels' range, or raise ``ValueError``."""
        set_ = object.__setattr__
        set_(self, "max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, 1, MAX_INT32))
        temperature = _real("temperature", self.temperature)
        if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature!r}"
            )
        set_(self, "temperature", temperature)
        top_p = _real("top_p", self.top_p)
        if not MIN_TOP_P <= top_p <= 1:
            raise ValueError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {top_p!r}")
        set_(self, "top_p", top_p)
        top_k = self.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not (top_k == -1 or 1 <= top_k <= MAX_INT32):
            raise ValueError(f"top_k must be -1 (off) or an integer in [1, {MAX_INT32}], got {top_k!r}")
        set_(self, "top_k", int(top_k))
        if self.seed is not None:
            set_(self, "seed", _integer("seed", self.seed, 0, MAX_SEED))
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Iterable):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        stops = tuple(self.stop_token_ids)
        set_(self, "stop_token_ids", tuple(_integer(f"stop_token_ids[{i}]", t, 0, MAX_INT32) for i, t in enumerate(stops)))

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
