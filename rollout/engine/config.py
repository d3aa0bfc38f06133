"""Engine knobs, validated once so that a bad option fails before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
# "torch": gather + SDPA for every step; "triton": decode steps read K/V in place with the paged kernel.
ATTENTION_BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of every preallocated buffer, and the scheduling switches.

    ``max_batch_tokens`` bounds the tokens of one forward (prefill chunks included) and
    sizes the route-capture device buffer; ``kv_slots`` is the KV pool size in tokens;
    ``max_context`` caps prompt + output per request (``None``: the model's
    ``max_position_embeddings``, clipped to ``kv_slots``).
    """

    device: str = "cpu"
    dtype: str = "float32"
    overlap: bool = True
    return_routed_experts: bool = True
    max_running_requests: int = 256
    max_batch_tokens: int = 4096
    kv_slots: int = 65536
    max_context: int | None = None
    enable_prefix_cache: bool = True
    attention_backend: str = "torch"
    cuda_graph: bool = False  # replay decode steps from CUDA graphs (CUDA + bfloat16 + triton attention)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_running_requests", "max_batch_tokens", "kv_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_context is not None and (
            isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 2
        ):
            raise ValueError(f"max_context must be an integer >= 2 or None, got {self.max_context!r}")
        for name in ("overlap", "return_routed_experts", "enable_prefix_cache", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"bad device {self.device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.cuda_graph and (device.type != "cuda" or self.dtype != "bfloat16" or self.attention_backend != "triton"):
            # fp32 experts and torch attention sync with the host or change shape every step: not capturable
            raise ValueError("cuda_graph=True needs device='cuda', dtype='bfloat16' and attention_backend='triton'")
        if self.attention_backend == "triton":
            import importlib.util
            import os

            if importlib.util.find_spec("triton") is None:
                raise ValueError("attention_backend='triton' needs the triton package")
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("attention_backend='triton' off CUDA needs TRITON_INTERPRET=1 (Triton's interpreter)")

    @classmethod
    def from_options(cls, **options: object) -> "EngineConfig":
        """Build from keyword options, naming any unknown one (typos must not pass silently)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)  # type: ignore[arg-type]

    def context_limit(self, model_max_positions: int) -> int:
        """Tokens one request may hold: prompt + output."""
        limit = self.max_context if self.max_context is not None else model_max_positions
        return min(limit, self.kv_slots)
