"""KV memory: the slot pool, the request->slot table and the prefix cache.

A *slot* holds one token's K and V for every layer, and is also the index of that
token's routes in the capture host cache, so whatever reuses a slot's KV (the
prefix cache) reuses its routes too. Slot 0 is never handed out: padded tokens
(a future CUDA-graph runner) write there harmlessly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class _Node:
    token: int
    slot: int
    parent: "_Node | None"
    children: dict[int, "_Node"] = field(default_factory=dict)
    refs: int = 0
    last_used: int = 0


class PrefixCache:
    """A token trie whose nodes own KV slots (and so the routes in those slots).

    Requests lock the path they reuse; unlocked leaves are evicted least recently
    used first. One node per token keeps insert/match/evict obviously correct; a
    radix (compressed) tree is the optimisation if long prompts make it matter.
    """

    def __init__(self) -> None:
        self._root = _Node(token=-1, slot=PAD_SLOT, parent=None)
        self._clock = itertools.count(1)
        self.num_cached = 0

    def match(self, tokens: list[int]) -> list[_Node]:
        """The cached path of the longest prefix of ``tokens``."""
        node, path, now = self._root, [], next(self._clock)
        for tok in tokens:
            node = node.children.get(tok)
            if node is None:
                break
            node.last_used = now
            path.append(node)
        return path

    @staticmethod
    def lock(path: list[_Node]) -> None:
        for node in path:
            node.refs += 1

    @staticmethod
    def unlock(path: list[_Node]) -> None:
        for node in path:
            node.refs -= 1

    def insert(self, tokens: list[int], slots: list[int]) -> list[int]:
        """Cache ``tokens`` -> ``slots``; returns the slots it did not keep (already cached)."""
        node, now, dup = self._root, next(self._clock), []
        for tok, slot in zip(tokens, slots):
            child = node.children.get(tok)
            if child is None:
                child = _Node(token=tok, slot=slot, parent=node)
                node.children[tok] = child
                self.num_cached += 1
            elif child.slot != slot:
                dup.append(slot)
            child.last_used = now
            node = child
        return dup

    def evict(self, needed: int) -> list[int]:
        """Free up to ``needed`` slots from unlocked leaves, oldest first."""
        freed: list[int] = []
        leaves = [n for n in self._iter_nodes() if not n.children and n.refs == 0]
        leaves.sort(key=lambda n: n.last_used)
        while leaves and len(freed) < needed:
            leaf = leaves.pop(0)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.token]
            self.num_cached -= 1
            freed.append(leaf.slot)
            if parent is not self._root and not parent.children and parent.refs == 0:
                # the parent just became an evictable leaf; keep the list ordered by age
                idx = next((i for i, n in enumerate(leaves) if n.last_used > parent.last_used), len(leaves))
                leaves.insert(idx, parent)
        return freed

    def _iter_nodes(self):
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
