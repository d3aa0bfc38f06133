"""Verifiable tasks on token ids for ``r3 train``: prompts, and a reward computed from the ids alone.

No tokenizer and nothing downloaded: a task is a rule over token ids that a verifier can
check exactly, like a math answer checker in a real RL run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ResidueTask:
    """Keep the residue class: an output token scores when ``id % modulus`` equals the previous token's.

    The reward of a completion is the share of its tokens that do (the first one is compared
    with the prompt's last token), so a uniformly random policy scores ``1 / modulus`` and the
    best one scores 1. The rule depends on the context, every token gets credit or not (a
    dense signal a tiny model can learn in a few steps), and any sequence is checked exactly.
    """

    modulus: int
    vocab_size: int

    def __post_init__(self) -> None:
        if not 2 <= self.modulus <= self.vocab_size:
            raise ValueError(f"train.modulus: must be in [2, vocab_size={self.vocab_size}], got {self.modulus}")

    def prompts(self, num: int, length: int, seed: int) -> list[list[int]]:
        """``num`` random prompts of ``length`` ids, the same for every arm given ``seed``."""
        return np.random.default_rng(seed).integers(0, self.vocab_size, size=(num, length)).tolist()

    def reward(self, prompt: Sequence[int], output: Sequence[int]) -> float:
        if not output:
            return 0.0
        residues = np.asarray([prompt[-1], *output], dtype=np.int64) % self.modulus
        return float(np.mean(residues[1:] == residues[:-1]))


TASKS = {"residue": ResidueTask}


def make_task(name: str, modulus: int, vocab_size: int) -> ResidueTask:
    if name not in TASKS:
        raise ValueError(f"train.task: unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](modulus=modulus, vocab_size=vocab_size)
