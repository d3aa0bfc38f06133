"""What every kernel test shares: the device it runs on and the bf16 case that only CUDA can check."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton's CPU interpreter computes bf16 tl.dot wrongly (a 16x16 bf16 dot is off by 1e10 there; fp16 and fp32
# are right), so the bf16 case is a gpu test; fp16 covers the low-precision path on CPU.
BF16 = pytest.param(torch.bfloat16, 2e-2, marks=[pytest.mark.gpu, pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's CPU interpreter miscomputes bf16 tl.dot; checked on CUDA")])
