import pytest

from rollout.engine.kvcache import PAD_SLOT, PrefixCache, SlotAllocator


def test_allocator_never_hands_out_the_pad_slot_and_refuses_overdraw():
    alloc = SlotAllocator(4)
    got = alloc.alloc(4)
    assert sorted(got) == [1, 2, 3, 4] and PAD_SLOT not in got
    with pytest.raises(RuntimeError, match="exhausted"):
        alloc.alloc(1)
    alloc.free(got[:2])
    assert alloc.num_free == 2


def test_prefix_cache_match_insert_and_duplicates():
    cache = PrefixCache()
    assert cache.insert([1, 2, 3], [10, 11, 12]) == []
    assert cache.match([1, 2, 9]).slots == (10, 11)
    # a second request computed the same tokens into other slots: those come back to be freed
    assert cache.insert([1, 2, 3, 4], [20, 21, 22, 23]) == [20, 21, 22]
    assert cache.match([1, 2, 3, 4]).slots == (10, 11, 12, 23)
    assert cache.num_cached == 4


def test_eviction_skips_locked_paths_and_goes_oldest_first():
    cache = PrefixCache()
    cache.insert([1, 2], [1, 2])
    cache.insert([5, 6], [5, 6])
    locked = cache.match([5, 6])  # newer, and locked
    cache.lock(locked)
    assert sorted(cache.evict(10)) == [1, 2]  # leaf 2 first, then its parent 1
    assert cache.evict(10) == []
    cache.unlock(locked)
    assert sorted(cache.evict(1)) == [6]
    assert cache.num_cached == 1
