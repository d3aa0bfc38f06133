"""The reward verl calls for the synthetic dataset (``reward.custom_reward_function.path``).

verl's naive reward manager calls ``compute_score(data_source, solution_str, ground_truth, extra_info)``
with the decoded response. A random-weight model almost never states the sum, so the
score also grades how much of the response is digits: GRPO then sees different
rewards inside each group and its advantages are not all zero.
"""

from __future__ import annotations

DATA_SOURCE = "r3/synthetic-add"  # the rows bench/verl_e2e/dataset.py writes


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 when the answer appears in the response, else the share of its characters that are digits (< 1)."""
    if data_source != DATA_SOURCE:
        raise ValueError(f"this reward scores {DATA_SOURCE!r} rows only, got data_source={data_source!r}")
    if ground_truth in solution_str:
        return 1.0
    if not solution_str:
        return 0.0
    return 0.99 * sum(ch.isdigit() for ch in solution_str) / len(solution_str)
