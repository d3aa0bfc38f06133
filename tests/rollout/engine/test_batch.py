"""Packing a step's host arrays into one transfer (rollout/engine/batch.py)."""

import numpy as np
import pytest
import torch

from rollout.engine.batch import VIEW_ALIGN_BYTES, to_device


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_every_view_is_aligned_and_holds_its_array(dtype):
    # odd lengths: packed back to back, the second view would start 8 (int64) or 4 (float32) bytes off a boundary
    arrays = [np.arange(65), np.arange(3).reshape(3, 1) * 7, np.zeros(0), np.arange(1) + 5, np.arange(10)]
    views = to_device(arrays, dtype, torch.device("cpu"))
    base = views[0].data_ptr()
    for a, v in zip(arrays, views):
        assert v.dtype == torch.from_numpy(np.zeros(0, dtype)).dtype and tuple(v.shape) == a.shape
        assert np.array_equal(v.numpy(), a.astype(dtype))
        assert (v.data_ptr() - base) % VIEW_ALIGN_BYTES == 0
