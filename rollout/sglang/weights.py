"""The RL verbs of ``SGLangBackend``, through SGLang's own HTTP endpoints (names and bodies of SGLang 0.5.17).

| verb | SGLang endpoint |
|---|---|
| ``weight_version`` | ``GET /model_info`` (``weight_version``; 0.5.17 answers 404 on the old ``/get_weight_version``) |
| ``update_weights_from_disk(path, version)`` | ``POST /update_weights_from_disk`` with ``weight_version`` |
| ``update_weights(weights, version)`` | checked here, written as safetensors under ``staging_dir``, then ``/update_weights_from_disk`` |
| ``flush_cache()`` | ``POST /flush_cache`` (SGLang refuses while requests run: ``ValueError``) |
| ``pause_generation(mode)`` / ``continue_generation()`` | ``POST /pause_generation`` / ``POST /continue_generation`` |
| ``release_memory(weights)`` / ``resume_memory()`` | ``POST /release_memory_occupation`` / ``POST /resume_memory_occupation`` with ``tags`` |

Why not ``/update_weights_from_tensor``: its payload is SGLang's ``MultiprocessingSerializer``
output, a pickle of CUDA IPC handles, and r3 never pickles across a process boundary. A
safetensors file costs a write and a read of the weights, and works wherever the server can
read ``staging_dir`` (same machine, or a shared file system).

Tensors are checked against the model's layout (``rollout/engine/weights.py``) before anything
is written, as on the built-in engine, then renamed to the checkpoint spelling SGLang's loaders
read (one tensor per expert): a trainer's fused ``experts.gate_up_proj`` is split per expert.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from rollout.atomic import atomic_dir
from rollout.engine.weight_update import check_version
from rollout.engine.weights import WeightLayout
from rollout.sglang.http_client import HTTPClient

PAUSE_MODES = ("abort", "retract", "in_place")
# in_flight -> abort_all_requests; "finish" is SGLang's default (its update lock waits for running requests)
_ABORT_ALL = {"finish": False, "abort": True}
STAGING_FILE = "model.safetensors"


def layout_of(config: dict) -> WeightLayout:
    """The checking layout of a model from its ``config.json`` (families the built-in engine knows)."""
    from rollout.engine.models import arch_from_config
    from rollout.engine.models.loader import layout_for

    try:
        arch = arch_from_config(config)
    except ValueError as exc:
        raise ValueError(f"update_weights checks names and shapes with the built-in engine's layout: {exc}; "
                         "use update_weights_from_disk with a checkpoint the server can read") from None
    return layout_for(arch, has_lm_head=not arch.tie_word_embeddings)


class SGLangWeights:
    """Weight, cache and memory control of one SGLang server."""

    def __init__(self, client: HTTPClient, staging_dir: str | os.PathLike | None = None) -> None:
        self.client = client
        self.staging_dir = Path(staging_dir) if staging_dir is not None else Path(tempfile.gettempdir())
        self._released: list[str] | None = None

    @property
    def weight_version(self) -> str:
        info = self.client.get_json("/model_info")
        if not isinstance(info, dict) or not isinstance(info.get("weight_version"), str):
            raise ValueError(f"/model_info has no weight_version string: {info!r}")
        return info["weight_version"]

    def update_weights_from_disk(self, model_path: str | os.PathLike, version: int | str, *,
                                 in_flight: str = "finish") -> dict[str, Any]:
        """Load ``model_path`` (a directory the *server* reads) in place; SGLang flushes its cache after."""
        body = {"model_path": str(model_path), "weight_version": str(check_version(version)),
                "abort_all_requests": _abort_all(in_flight), "flush_cache": True}
        reply = self.client.post_json("/update_weights_from_disk", body)
        if not isinstance(reply, dict) or reply.get("success") is not True:
            raise ValueError(f"SGLang did not update the weights: {reply!r}")
        return reply

    def update_weights(self, layout: WeightLayout, weights: object, version: int | str, *,
                       in_flight: str = "finish") -> dict[str, Any]:
        """Check every tensor, stage them as one safetensors file, load it through ``/update_weights_from_disk``."""
        from safetensors.torch import save_file

        version = check_version(version)
        _abort_all(in_flight)
        tensors = layout.to_checkpoint(layout.plan(weights))  # every check before anything is written
        target = self.staging_dir / f"r3-weights-{uuid.uuid4().hex}"
        try:
            with atomic_dir(target) as tmp:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / STAGING_FILE))
            return self.update_weights_from_disk(target, version, in_flight=in_flight)
        finally:
            shutil.rmtree(target, ignore_errors=True)

    def flush_cache(self) -> None:
        self.client.request("POST", "/flush_cache", b"", text=True)

    def pause_generation(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        self.client.post_json("/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self.client.post_json("/continue_generation", {})

    def release_memory(self, weights: bool = False) -> None:
        if self._released is not None:
            raise ValueError("the server's memory is already released: call resume_memory() first")
        tags = ["kv_cache", "weights"] if weights else ["kv_cache"]
        self.client.post_json("/release_memory_occupation", {"tags": tags})
        self._released = tags

    def resume_memory(self) -> None:
        if self._released is None:
            raise ValueError("resume_memory() without release_memory()")
        self.client.post_json("/resume_memory_occupation", {"tags": self._released})
        self._released = None


def _abort_all(in_flight: str) -> bool:
    if in_flight == "continue":
        raise ValueError(
            "in_flight='continue' is refused for SGLang: it recomputes retracted requests' routes on the new "
            "weights (old logprobs paired with new routes, miles #3277) and reports one version per request; "
            "use 'finish' or 'abort', or the built-in engine"
        )
    if in_flight not in _ABORT_ALL:
        raise ValueError(f"in_flight must be one of ('finish', 'abort', 'continue'), got {in_flight!r}")
    return _ABORT_ALL[in_flight]
