"""docs/recipes.md is the one place recipe keys are described: it must list exactly the schema's keys and defaults."""

from __future__ import annotations

from pathlib import Path

import dataclasses
import re

from recipes.config import iter_keys

REPO = Path(__file__).resolve().parents[2]


def _documented() -> dict[str, str]:
    text = (REPO / "docs" / "recipes.md").read_text()
    section = text.split("## Recipe keys", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_.]+)` \| [^|]+ \| ([^|]+) \|", section, flags=re.M)
    return {key: default.strip() for key, default in rows}


def _yaml_literal(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def test_every_key_documented_with_its_default():
    documented = _documented()
    schema = {key: _yaml_literal(default) for key, _, default in iter_keys()}
    assert list(documented) == list(schema)  # same keys, same order
    assert documented == schema
