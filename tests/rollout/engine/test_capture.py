import numpy as np
import torch

from rollout.engine.capture import RouteCapture


def test_finalize_writes_compact_rows_by_slot_and_honours_keep():
    cap = RouteCapture(num_moe_layers=2, top_k=2, num_experts=8, max_batch_tokens=4, num_slots=10, device=torch.device("cpu"))
    assert cap.host_cache.dtype == np.uint8 and (cap.host_cache == 255).all()
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    cap.record(0, ids)
    cap.record(1, ids + 1)
    out = cap.copy_to_cpu(np.array([7, 3, 5]))
    out.finalize(cap.host_cache, keep=np.array([True, False, True]))
    assert cap.host_cache[7].tolist() == [[0, 1], [1, 2]]
    assert cap.host_cache[5].tolist() == [[4, 5], [5, 6]]
    assert (cap.host_cache[3] == 255).all()  # dropped row: never captured


def test_many_experts_use_uint16_end_to_end():
    cap = RouteCapture(num_moe_layers=1, top_k=2, num_experts=300, max_batch_tokens=2, num_slots=4, device=torch.device("cpu"))
    cap.record(0, torch.tensor([[299, 256], [0, 1]]))
    cap.copy_to_cpu(np.array([1, 2])).finalize(cap.host_cache)
    assert cap.host_cache.dtype == np.dtype("<u2")
    rows = np.full((3, 1, 2), 7, dtype=cap.host_dtype)
    cap.gather([1, 2], rows)
    assert rows.tolist() == [[[299, 256]], [[0, 1]], [[7, 7]]]  # only the first len(slots) rows are written


def test_staging_buffers_alternate_so_an_unfinalized_step_is_not_overwritten():
    cap = RouteCapture(num_moe_layers=1, top_k=1, num_experts=8, max_batch_tokens=2, num_slots=4, device=torch.device("cpu"))
    cap.record(0, torch.tensor([[1]]))
    first = cap.copy_to_cpu(np.array([1]))
    cap.record(0, torch.tensor([[6]]))
    second = cap.copy_to_cpu(np.array([2]))
    first.finalize(cap.host_cache)
    second.finalize(cap.host_cache)
    assert cap.host_cache[1, 0, 0] == 1 and cap.host_cache[2, 0, 0] == 6
