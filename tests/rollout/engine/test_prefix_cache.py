"""The radix prefix cache: splits, locks, LRU eviction, duplicates, and a differential test.

A cached token must map to exactly the slot that computed it (the slot also indexes its
routes), so the randomized test checks every match, duplicate and eviction against a
per-token reference model.
"""

import random

import pytest

from rollout.engine.kvcache import PrefixCache


def test_partial_match_splits_a_run_and_both_halves_keep_their_slots():
    cache = PrefixCache()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    assert cache.match([1, 2, 9]).slots == (10, 11)
    # a diverging insert hangs off the split point; its shared head was computed twice
    assert cache.insert([1, 2, 7, 8], [20, 21, 22, 23]) == [20, 21]
    assert cache.match([1, 2, 3, 4, 5]).slots == (10, 11, 12, 13)
    assert cache.match([1, 2, 7, 8]).slots == (10, 11, 22, 23)
    assert cache.match([1, 3]).slots == (10,)
    assert cache.num_cached == 6
    head = cache.match([1, 2])
    cache.lock(head)
    assert sorted(cache.evict(100)) == [12, 13, 22, 23]  # both tails go, the locked head stays
    assert cache.match([1, 2, 3]).slots == (10, 11) and cache.num_cached == 2


def test_splitting_a_locked_run_keeps_the_whole_run_locked():
    cache = PrefixCache()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    whole = cache.match([1, 2, 3, 4])
    cache.lock(whole)
    cache.insert([1, 2, 5], [20, 21, 22])  # splits the locked run after [1, 2]
    cache.match([1])  # and again after [1]
    assert cache.evict(100) == [22]
    cache.unlock(whole)
    assert sorted(cache.evict(100)) == [10, 11, 12, 13]
    assert cache.num_cached == 0 and cache.match([1, 2, 3, 4]).slots == ()


def test_a_lock_holds_until_every_locker_unlocks():
    cache = PrefixCache()
    cache.insert([1, 2, 3], [1, 2, 3])
    first, second = cache.match([1, 2, 3]), cache.match([1, 2])
    cache.lock(first)
    cache.lock(second)
    assert cache.evict(10) == []
    cache.unlock(first)
    assert cache.evict(10) == [3]  # [1, 2] is still held by the second request
    cache.unlock(second)
    assert sorted(cache.evict(10)) == [1, 2]


def test_eviction_is_least_recently_used_first_and_takes_a_run_from_its_tail():
    cache = PrefixCache()
    cache.insert([1, 1, 1], [11, 12, 13])
    cache.insert([2, 2, 2], [21, 22, 23])
    cache.insert([3, 3, 3], [31, 32, 33])
    cache.match([1, 1])  # [1, 1] is now the newest, [1] beyond it stays the oldest
    assert cache.evict(1) == [13]
    assert sorted(cache.evict(3)) == [21, 22, 23]
    assert cache.evict(4) == [31, 32, 33, 12]  # then [1, 1] is a leaf again, newest, cut from its tail
    assert cache.match([1, 1, 1]).slots == (11,)


def test_evict_returns_what_was_asked_when_the_cache_holds_enough():
    cache = PrefixCache()
    rng = random.Random(1)
    slot = 1
    for _ in range(40):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        dup = cache.insert(tokens, list(range(slot, slot + len(tokens))))
        slot += len(tokens)
        assert len(set(dup)) == len(dup)
    total, freed = cache.num_cached, []
    while cache.num_cached:
        needed = rng.randrange(1, 9)
        got = cache.evict(needed)
        assert len(got) == min(needed, total - len(freed))
        freed += got
    assert len(set(freed)) == len(freed) == total
    assert cache.evict(5) == []


def test_duplicate_insert_returns_the_duplicate_slots_and_keeps_the_first():
    cache = PrefixCache()
    assert cache.insert([5, 6, 7], [1, 2, 3]) == []
    assert cache.insert([5, 6, 7], [1, 2, 3]) == []  # same slots (a reused prefix): nothing to free
    assert cache.insert([5, 6, 7, 8], [1, 9, 3, 4]) == [9]
    assert cache.insert([5, 6], [7, 8]) == [7, 8]
    assert cache.match([5, 6, 7, 8]).slots == (1, 2, 3, 4) and cache.num_cached == 4


def test_insert_refuses_tokens_and_slots_of_different_lengths():
    with pytest.raises(ValueError, match="one slot per token"):
        PrefixCache().insert([1, 2], [1])


def test_repeated_touches_do_not_grow_the_eviction_heap_without_bound():
    cache = PrefixCache()
    cache.insert([1, 2], [1, 2])
    for _ in range(1000):
        cache.match([1, 2])  # each touch of an unlocked leaf pushes a heap entry
    assert len(cache._heap) <= 100
    assert sorted(cache.evict(5)) == [1, 2]


class _Reference:
    """One entry per cached prefix: the obviously correct model the radix tree must equal."""

    def __init__(self) -> None:
        self.slot: dict[tuple, int] = {}
        self.used: dict[tuple, int] = {}
        self.refs: dict[tuple, int] = {}
        self.clock = 0

    def match(self, tokens: list[int]) -> tuple:
        self.clock += 1
        n = 0
        while n < len(tokens) and tuple(tokens[: n + 1]) in self.slot:
            n += 1
            self.used[tuple(tokens[:n])] = self.clock
        return tuple(self.slot[tuple(tokens[:i])] for i in range(1, n + 1))

    def lock(self, tokens: tuple, delta: int) -> None:
        for i in range(1, len(tokens) + 1):
            self.refs[tokens[:i]] = self.refs.get(tokens[:i], 0) + delta

    def insert(self, tokens: list[int], slots: list[int]) -> list[int]:
        self.clock += 1
        dup = []
        for i, s in enumerate(slots):
            key = tuple(tokens[: i + 1])
            if key not in self.slot:
                self.slot[key] = s
            elif self.slot[key] != s:
                dup.append(s)
            self.used[key] = self.clock
        return dup

    def evict(self, needed: int) -> list[int]:
        freed = []
        while len(freed) < needed:
            leaves = [k for k in self.slot if not self.refs.get(k) and not self._has_child(k)]
            if not leaves:
                break
            oldest = min(leaves, key=lambda k: (self.used[k], -len(k)))
            freed.append(self.slot.pop(oldest))
            del self.used[oldest]
        return freed

    def _has_child(self, key: tuple) -> bool:
        return any(len(k) == len(key) + 1 and k[:-1] == key for k in self.slot)


@pytest.mark.parametrize("seed", range(6))
def test_radix_cache_matches_the_per_prefix_reference(seed):
    rng = random.Random(seed)
    cache, ref = PrefixCache(), _Reference()
    held: list[tuple] = []  # (match, tokens) of requests holding a lock
    next_slot = 1
    for _ in range(400):
        op = rng.random()
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        if op < 0.35:  # a request finishes: its matched prefix is reused, the rest is new
            got = cache.match(tokens)
            assert got.slots == ref.match(tokens)
            slots = list(got.slots) + list(range(next_slot, next_slot + len(tokens) - got.num_tokens))
            next_slot += len(tokens) - got.num_tokens
            if rng.random() < 0.3:  # or it recomputed everything into fresh slots
                slots = list(range(next_slot, next_slot + len(tokens)))
                next_slot += len(tokens)
            assert cache.insert(tokens, slots) == ref.insert(tokens, slots)
        elif op < 0.6:  # a request is admitted and locks its prefix
            got = cache.match(tokens)
            assert got.slots == ref.match(tokens)
            cache.lock(got)
            ref.lock(tuple(tokens[: got.num_tokens]), +1)
            held.append((got, tuple(tokens[: got.num_tokens])))
        elif op < 0.8 and held:  # a request releases its prefix
            got, prefix = held.pop(rng.randrange(len(held)))
            cache.unlock(got)
            ref.lock(prefix, -1)
        else:
            needed = rng.randrange(1, 8)
            assert sorted(cache.evict(needed)) == sorted(ref.evict(needed))
        assert cache.num_cached == len(ref.slot)
    for got, prefix in held:
        cache.unlock(got)
        ref.lock(prefix, -1)
    assert sorted(cache.evict(10**6)) == sorted(ref.slot.values())
    assert cache.num_cached == 0
