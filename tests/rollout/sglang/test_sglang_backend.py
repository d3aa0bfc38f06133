"""SGLangBackend construction errors (its HTTP path runs against r3 serve in tests/rollout/serve)."""

from __future__ import annotations

import pytest

from rollout.sglang.backend import SGLangBackend


def test_backend_needs_a_url_or_the_sglang_extra(sglang_fixture):
    with pytest.raises(ValueError, match="url= .* or model_path="):
        SGLangBackend()
    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="sglang extra"):
            SGLangBackend(model_path=sglang_fixture)
    with pytest.raises(ValueError, match="only apply to the in-process engine"):
        SGLangBackend(url="http://127.0.0.1:1", model_path=sglang_fixture, attention_backend="triton")
