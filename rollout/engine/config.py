"""Engine knobs, validated once so that a bad option fails before any weight is loaded.

Defaults depend on the device, so the fast path is the one a plain ``Engine(path, device="cuda")``
gets: on CUDA the checkpoint's dtype, the Triton kernels (paged attention, fused MoE, fused
norms), CUDA graphs, and a KV pool sized from free device memory; on CPU float32 and the
torch paths, whose numbers the CPU tests and recipes are pinned to. ``"auto"`` / ``None``
mean "the default for this device"; ``resolved()`` turns them into concrete values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"
# "torch": gather + SDPA; "triton": the paged kernels, which read K/V in place from the slot pool.
ATTENTION_BACKENDS = ("torch", "triton")
# "torch": one GEMM pair per expert in a host loop (reads the expert counts back: a host sync per MoE layer);
# "grouped_mm": torch._grouped_mm over tokens sorted by expert (CUDA, bfloat16); "triton": the fused MoE kernel.
MOE_BACKENDS = ("torch", "grouped_mm", "triton")
# The small ops (residual add + RMSNorm, q/k norm + RoPE + KV write, router softmax + top-k, and sampling
# without top-p/top-k): "torch" runs them as separate torch ops, "triton" as one fused kernel each.
LAYER_KERNELS = ("torch", "triton")

CPU_KV_SLOTS = 65536  # the pool CPU engines get unless kv_slots says otherwise
DEFAULT_MEM_FRACTION = 0.85  # CUDA: share of the device's memory for weights + KV pool (SGLang's mem_fraction_static)
CPU_MAX_BATCH_TOKENS = 4096
CUDA_MAX_BATCH_TOKENS = 8192  # larger prefill chunks amortise each chunk's pass over the weights


def checkpoint_dtype(cfg: dict) -> str | None:
    """The dtype a checkpoint's ``config.json`` declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of every preallocated buffer, the kernels, and the scheduling switches.

    ``max_batch_tokens`` bounds the tokens of one forward (prefill chunks included) and
    sizes the route-capture device buffer; ``kv_slots`` is the KV pool size in tokens
    (``None``: 65,536 on CPU, from free device memory on CUDA, see ``rollout.engine.memory``);
    ``max_running_requests`` (``None``: derived from the pool) also bounds the decode CUDA
    graphs; ``max_context`` caps prompt + output per request (``None``: the model's
    ``max_position_embeddings``, clipped to ``kv_slots``).
    """

    device: str = "cpu"
    dtype: str = AUTO  # CPU: float32; CUDA: the checkpoint's torch_dtype
    overlap: bool = True
    return_routed_experts: bool = True
    max_running_requests: int | None = None
    max_batch_tokens: int | None = None
    kv_slots: int | None = None
    mem_fraction_static: float | None = None  # CUDA only; None: DEFAULT_MEM_FRACTION
    max_context: int | None = None
    enable_prefix_cache: bool = True
    attention_backend: str = AUTO  # CPU: torch; CUDA: triton
    prefill_attention_backend: str = AUTO  # prefill/extend steps only; auto: attention_backend
    moe_backend: str = AUTO  # CPU: torch; CUDA: triton
    layer_kernels: str = AUTO  # torch on both devices until the Triton layer kernels have run in a GPU benchmark
    cuda_graph: bool | None = None  # replay decode steps from CUDA graphs; None: on for CUDA

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES + (AUTO,):
            raise ValueError(f"dtype must be one of {DTYPES} or {AUTO!r}, got {self.dtype!r}")
        for name in ("max_running_requests", "max_batch_tokens", "kv_slots"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_context is not None and (
            isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 2
        ):
            raise ValueError(f"max_context must be an integer >= 2 or None, got {self.max_context!r}")
        fraction = self.mem_fraction_static
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction < 1):
            raise ValueError(f"mem_fraction_static must be a number in (0, 1) or None, got {fraction!r}")
        for name in ("overlap", "return_routed_experts", "enable_prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True, False or None, got {self.cuda_graph!r}")
        for name, choices in (("attention_backend", ATTENTION_BACKENDS), ("prefill_attention_backend", ATTENTION_BACKENDS),
                              ("moe_backend", MOE_BACKENDS), ("layer_kernels", LAYER_KERNELS)):
            if getattr(self, name) not in choices + (AUTO,):
                raise ValueError(f"{name} must be one of {choices} or {AUTO!r}, got {getattr(self, name)!r}")
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"bad device {self.device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.mem_fraction_static is not None and device.type != "cuda":
            raise ValueError("mem_fraction_static sizes the KV pool from device memory: it needs device='cuda' "
                             "(on CPU set kv_slots)")
        if self.is_resolved:
            self._check_resolved(device)

    # ---------------------------------------------------------------- defaults
    @property
    def is_resolved(self) -> bool:
        """True once no device-dependent default is left (``kv_slots``/``max_running_requests`` aside)."""
        return AUTO not in (self.dtype, self.attention_backend, self.prefill_attention_backend, self.moe_backend,
                            self.layer_kernels) and self.cuda_graph is not None and self.max_batch_tokens is not None

    def resolved(self, checkpoint_dtype: str | None = None) -> "EngineConfig":
        """Every ``auto`` replaced by this device's default, then the combination checked.

        ``checkpoint_dtype`` is the checkpoint's ``torch_dtype``; CUDA runs in it when it is one
        of ``DTYPES`` (bfloat16 otherwise). Raises ``ValueError`` for a combination that cannot work.
        """
        import torch

        return dataclasses.replace(self, **self.defaults_for(torch.device(self.device).type == "cuda", checkpoint_dtype))

    def defaults_for(self, cuda: bool, checkpoint_dtype: str | None) -> dict:
        """The values ``resolved`` fills in, for a CUDA or a CPU device (options given explicitly are kept)."""
        fast = "triton" if cuda else "torch"
        dtype = self.dtype
        if dtype == AUTO:
            dtype = (checkpoint_dtype if checkpoint_dtype in DTYPES else "bfloat16") if cuda else "float32"
        attention = fast if self.attention_backend == AUTO else self.attention_backend
        values = dict(
            dtype=dtype,
            attention_backend=attention,
            prefill_attention_backend=attention if self.prefill_attention_backend == AUTO else self.prefill_attention_backend,
            moe_backend=fast if self.moe_backend == AUTO else self.moe_backend,
            # the fused norm/RoPE/router/sampler kernels: 1.41x the torch ops on the H200 at batch 64 (2026-12-02)
            layer_kernels=fast if self.layer_kernels == AUTO else self.layer_kernels,
            max_batch_tokens=self.max_batch_tokens or (CUDA_MAX_BATCH_TOKENS if cuda else CPU_MAX_BATCH_TOKENS),
            cuda_graph=self.cuda_graph,
        )
        if self.cuda_graph is None:
            # graphs need the kernels that never read a value back to the host
            values["cuda_graph"] = cuda and attention == "triton" and values["moe_backend"] != "torch"
        return values

    def _check_resolved(self, device) -> None:
        import importlib.util
        import os

        cuda = device.type == "cuda"
        uses_triton = "triton" in (self.attention_backend, self.prefill_attention_backend, self.moe_backend,
                                   self.layer_kernels)
        if uses_triton:
            if importlib.util.find_spec("triton") is None:
                raise ValueError("the triton backends need the triton package (set the *_backend options to 'torch')")
            if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("the triton backends off CUDA need TRITON_INTERPRET=1 (Triton's interpreter)")
        if self.moe_backend == "grouped_mm" and not (cuda and self.dtype == "bfloat16"):
            raise ValueError("moe_backend='grouped_mm' needs device='cuda' and dtype='bfloat16' (torch._grouped_mm)")
        if cuda and self.moe_backend == "torch" and self.overlap:
            raise ValueError(
                "moe_backend='torch' on CUDA reads each MoE layer's expert counts back to the host, which "
                "synchronises every layer and leaves nothing to overlap: use moe_backend='triton' (any dtype) or "
                "'grouped_mm' (bfloat16), or overlap=False")
        if self.cuda_graph and not (cuda and self.attention_backend == "triton" and self.moe_backend != "torch"):
            # torch attention changes shape every step and the torch experts sync with the host: not capturable
            raise ValueError("cuda_graph=True needs device='cuda', attention_backend='triton' and a moe_backend "
                             "other than 'torch'")

    @classmethod
    def from_options(cls, **options: object) -> "EngineConfig":
        """Build from keyword options, naming any unknown one (typos must not pass silently)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)  # type: ignore[arg-type]

    def context_limit(self, model_max_positions: int) -> int:
        """Tokens one request may hold: prompt + output (not clipped to the pool while it is unsized)."""
        limit = self.max_context if self.max_context is not None else model_max_positions
        return min(limit, self.kv_slots) if self.kv_slots is not None else limit
