"""KV memory: the slot pool, the request->slot table and the prefix cache.

A *slot* holds one token's K and V for every layer, and is also the index of that
token's routes in the capture host cache, so whatever reuses a slot's KV (the
prefix cache) reuses its routes too. Slot 0 (``PAD_SLOT``) is never handed out: the padded
rows of a CUDA-graph decode batch (``cuda_graph.py``) write there harmlessly.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

PAD_SLOT = 0


class KVPool:
    """K and V for every layer: ``[layers, slots + 1, kv_heads, head_dim]`` each."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_slots + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


class SlotAllocator:
    """A free list of slots ``1..num_slots``."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots, 0, -1))  # pop() hands out low slots first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked for {n} slots, {len(self._free)} free")  # scheduler checks first
        out = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return out

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)


class RequestTable:
    """Rows of the device request->slot table ``[max_running_requests + 1, max_context]``.

    Attention reads each sequence's context slots through its row, so the host never
    ships whole slot lists to the device: a step only writes its new entries. The last
    row (``pad_row``) is never handed out: padded batch rows point there.
    """

    def __init__(self, max_requests: int, max_context: int, device: torch.device) -> None:
        self.req_to_slot = torch.zeros(max_requests + 1, max_context, dtype=torch.int64, device=device)
        self.pad_row = max_requests
        self._free_rows = list(range(max_requests - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)


class _Node:
    """A run of cached tokens and the slots that computed them, one slot per token.

    ``refs`` counts the requests whose locked prefix runs through this node; a lock
    covers the whole run, so a request's prefix always ends at a node boundary
    (``match`` splits a run where the prefix ends).
    """

    __slots__ = ("key", "slots", "parent", "children", "refs", "last_used")

    def __init__(self, key: list[int], slots: list[int], parent: "_Node | None", last_used: int) -> None:
        self.key = key
        self.slots = slots
        self.parent = parent  # None once evicted (and for the root)
        self.children: dict[int, _Node] = {}  # keyed by the child's first token
        self.refs = 0
        self.last_used = last_used


@dataclass(frozen=True)
class PrefixMatch:
    """The cached part of a request: lock/unlock it as one; ``slots`` serve its first tokens.

    Lock it before the next ``evict``: an unlocked match may lose its nodes.
    """

    node: _Node
    slots: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.slots)


class PrefixCache:
    """A radix tree of token runs whose nodes own KV slots (and so the routes in those slots).

    Requests lock the prefix they reuse; unlocked leaves are evicted least recently
    used first, from the tail of their run when only part of one is needed. Eviction
    candidates live in a lazy min-heap keyed by ``last_used``: an entry is pushed
    whenever a node becomes (or, touched, stays) an unlocked leaf, and entries that no
    longer describe their node are skipped when popped, so evicting costs O(log n) per
    leaf instead of a walk over the whole cache.
    """

    def __init__(self) -> None:
        self._root = _Node(key=[], slots=[], parent=None, last_used=0)
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, _Node]] = []  # (last_used, tie-break, node)
        self._tie = itertools.count()
        self._num_nodes = 0
        self.num_cached = 0

    def match(self, tokens: list[int]) -> PrefixMatch:
        """The longest cached prefix of ``tokens``, marked as just used."""
        node, i, now, slots = self._root, 0, next(self._clock), []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_len(child.key, tokens, i)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_used = now
            slots += child.slots
            node, i = child, i + k
        self._offer(node)
        return PrefixMatch(node, tuple(slots))

    def lock(self, match: PrefixMatch) -> None:
        """Pin the matched run and its ancestors (their KV and routes) while a request reads them."""
        node = match.node
        while node is not self._root:
            node.refs += 1
            node = node.parent

    def unlock(self, match: PrefixMatch) -> None:
        """Release a ``lock``; the run becomes evictable once no other request holds it."""
        node = match.node
        while node is not self._root:
            node.refs -= 1
            assert node.refs >= 0, "prefix-cache node unlocked more often than locked"
            node = node.parent
        self._offer(match.node)

    def insert(self, tokens: list[int], slots: list[int]) -> list[int]:
        """Cache ``tokens`` -> ``slots``; returns the slots it did not keep (already cached)."""
        if len(tokens) != len(slots):
            raise ValueError(f"insert needs one slot per token: {len(tokens)} tokens, {len(slots)} slots")
        node, i, now, dup = self._root, 0, next(self._clock), []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = _Node(key=list(tokens[i:]), slots=list(slots[i:]), parent=node, last_used=now)
                node.children[tokens[i]] = child
                self._num_nodes += 1
                self.num_cached += len(tokens) - i
                node = child
                break
            k = _common_len(child.key, tokens, i)
            if k < len(child.key):
                child = self._split(child, k)
            mine = slots[i : i + k]
            if mine != child.slots:
                dup += [s for s, kept in zip(mine, child.slots) if s != kept]
            child.last_used = now
            node, i = child, i + k
        self._offer(node)
        return dup

    def evict(self, needed: int) -> list[int]:
        """Free up to ``needed`` slots from unlocked leaves, oldest first."""
        freed: list[int] = []
        short = needed
        while short > 0 and self._heap:
            last_used, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.children or node.refs or last_used != node.last_used:
                continue  # stale entry: evicted, grown, locked or touched since it was pushed
            keep = max(len(node.slots) - short, 0)
            freed += node.slots[keep:]
            short -= len(node.slots) - keep
            self.num_cached -= len(node.slots) - keep
            if keep:
                node.key, node.slots = node.key[:keep], node.slots[:keep]
                self._offer(node)
                continue
            parent = node.parent
            del parent.children[node.key[0]]
            node.parent = None
            self._num_nodes -= 1
            self._offer(parent)
        return freed

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut ``node``'s run after ``k`` tokens; returns the new head, ``node`` keeps the tail.

        ``node`` stays the deeper object so a lock taken on it still covers the whole run.
        """
        parent = node.parent
        assert parent is not None
        head = _Node(key=node.key[:k], slots=node.slots[:k], parent=parent, last_used=node.last_used)
        head.refs = node.refs  # every lock through node runs through its head too
        head.children[node.key[k]] = node
        parent.children[node.key[0]] = head
        node.key, node.slots, node.parent = node.key[k:], node.slots[k:], head
        self._num_nodes += 1
        return head

    def _offer(self, node: _Node) -> None:
        """Push ``node`` as an eviction candidate if it is an unlocked leaf."""
        if node is self._root or node.children or node.refs:
            return
        heapq.heappush(self._heap, (node.last_used, next(self._tie), node))
        if len(self._heap) > 2 * self._num_nodes + _HEAP_SLACK:
            self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale entries; amortised O(1) per push since it runs once per ~num_nodes pushes."""
        live, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif not node.refs:
                live.append((node.last_used, next(self._tie), node))
        heapq.heapify(live)
        self._heap = live


_HEAP_SLACK = 64  # stale heap entries tolerated before compaction on a near-empty cache


def _common_len(key: list[int], tokens: list[int], start: int) -> int:
    """Length of the common prefix of ``key`` and ``tokens[start:]``."""
    n = min(len(key), len(tokens) - start)
    if key[:n] == tokens[start : start + n]:  # the usual case, compared in C
        return n
    return next(j for j in range(n) if key[j] != tokens[start + j])
