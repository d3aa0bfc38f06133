"""Every MoE family of the installed transformers, found at collection time, replays correctly or is refused up front.

Nothing here names a family: ``trainer_bridge.families`` enumerates them from transformers itself,
so a newer transformers with new families is covered without editing this file.
"""

from __future__ import annotations

import json

import pytest

from rollout.moe_spec import MoESpec
from trainer_bridge.families import TinyBuildError, build_tiny, check_family, moe_families
from trainer_bridge.routers import model_moe_spec

FAMILIES = moe_families()
# The refusals this project stands behind; any other ValueError from replay() on a family is a bug.
REFUSALS = (
    "hash routing",
    "more than one routing decision per layer",
    "selection is not one top-k",
    "selection inside the experts",
    "no MoE block found",
)


def test_the_survey_finds_the_families():
    assert len(FAMILIES) >= 7, [f.model_type for f in FAMILIES]


def _tiny(family):
    """The tiny model, or None when transformers' own native forward of it fails (no R3 code ran yet).

    Such a family is "not checked" in docs/families.md: there is nothing to replay. How many families
    may end that way is bounded by ``test_the_survey_builds_most_families``.
    """
    try:
        return build_tiny(family)
    except TinyBuildError as e:
        assert f"tiny {family.model_type}" in str(e), e
        return None


def test_the_survey_builds_most_families():
    built = 0
    for family in FAMILIES:
        try:
            build_tiny(family)
            built += 1
        except TinyBuildError:
            pass
    assert built >= 0.9 * len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_family_replays_or_is_refused_before_any_forward(family):
    if _tiny(family) is None:
        return
    outcome = check_family(family)  # asserts the replay contract, or that the refusal came before any forward
    if not outcome.replays:
        assert any(r in outcome.reason for r in REFUSALS), outcome.reason


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_spec_from_config_json_agrees_with_the_model(family):
    model = _tiny(family)
    if model is None:
        return
    try:
        found = model_moe_spec(model)
    except ValueError as e:
        assert "no MoE block found" in str(e)
        return
    config_json = json.loads(model.config.to_json_string())  # what save_pretrained writes: defaults left out
    assert MoESpec.from_config(config_json) == found
    assert MoESpec.from_config(model.config) == found
