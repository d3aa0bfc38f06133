"""``RolloutWorker``: the one public way to generate rollouts, whichever engine serves them.

The built-in engine runs in-process; ``engine="sglang"`` talks to an SGLang server
through ``rollout.sglang.backend.SGLangBackend`` (imported lazily so the built-in
path needs neither it nor an HTTP client). Both return ``Rollout`` objects with
``RoutedExperts`` routes. With SGLang, ``device``, ``dtype`` and ``overlap`` are the
server's own launch settings, so they are not taken here: passing a non-default value
raises rather than being silently ignored.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from rollout.types import Rollout, SamplingParams

ENGINES = ("builtin", "sglang")
_BUILTIN_ONLY = ("device", "dtype", "overlap")  # SGLang takes these at server launch


class RolloutWorker:
    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        engine: str = "builtin",
        device: str = "cpu",
        dtype: str = "auto",  # the engine's default: float32 on CPU, the checkpoint's dtype on CUDA
        overlap: bool = True,
        return_routed_experts: bool = True,
        **engine_options: Any,
    ) -> None:
        if engine == "builtin":
            if model_path is None:
                raise ValueError("the builtin engine needs model_path (an HF checkpoint directory)")
            from rollout.engine.engine import Engine

            self._backend: Any = Engine(
                model_path, device=device, dtype=dtype, overlap=overlap,
                return_routed_experts=return_routed_experts, **engine_options,
            )
        elif engine == "sglang":
            from rollout.sglang.backend import SGLangBackend

            defaults = inspect.signature(RolloutWorker.__init__).parameters
            given = {"device": device, "dtype": dtype, "overlap": overlap}
            ignored = [k for k in _BUILTIN_ONLY if given[k] != defaults[k].default]
            if ignored:
                raise ValueError(
                    f"engine='sglang' does not take {ignored}: set them when launching the SGLang server"
                )

            self._backend = SGLangBackend(model_path=model_path, return_routed_experts=return_routed_experts, **engine_options)
        else:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self.engine = engine

    @property
    def backend(self) -> Any:
        """The engine object itself (``rollout.engine.engine.Engine`` for builtin)."""
        return self._backend

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams | list[SamplingParams],
        start_len: int | list[int] = 0,
    ) -> list[Rollout]:
        """One ``Rollout`` per prompt, in order; routes cover ``[start_len, len(prompt)+len(output)-1)``."""
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        if prompts and all(isinstance(p, int) for p in prompts):
            raise ValueError(
                "prompts must be a list of prompts, each a list of token ids, e.g. [[1, 2, 3], [4, 5]]; "
                f"got a flat list of {len(prompts)} ints (for one prompt, pass [prompt])"
            )
        return self._backend.generate(list(prompts), sampling, start_len)

    # RL verbs: the same on both engines (SGLang through its own endpoints, rollout/sglang/weights.py)
    @property
    def weight_version(self) -> int | str:
        """The version of the weights the engine now samples with."""
        return self._backend.weight_version

    def update_weights(self, weights: Any, version: int | str, *, in_flight: str = "finish") -> None:
        """New weights in place: ``weights`` maps transformers parameter names to tensors (any subset).

        Every tensor is checked before any is written; a bad one raises ``ValueError`` and the
        engine is unchanged. ``in_flight``: ``"finish"`` unfinished requests on the old weights
        first, ``"abort"`` them, or (built-in engine only) ``"continue"`` them with per-token
        versions in ``Rollout.output_weight_versions``. Caches filled by old weights are flushed.
        """
        self._backend.update_weights(weights, version, in_flight=in_flight)

    def flush_cache(self) -> None:
        """Forget every cached prefix (KV and routes)."""
        self._backend.flush_cache()

    def release_memory(self, weights: bool = False) -> None:
        """Free the KV cache (and with ``weights=True`` the weights) for a colocated trainer."""
        self._backend.release_memory(weights=weights)

    def resume_memory(self) -> None:
        self._backend.resume_memory()

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "RolloutWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
