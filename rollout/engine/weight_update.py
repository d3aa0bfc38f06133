"""New weights into a running engine: settle the requests in flight, copy in place, forget what the old weights made.

``Engine.update_weights(weights, version, in_flight=...)`` runs, in order:

1. **check** every name, shape, dtype and value against the engine's layout
   (``rollout/engine/weights.py``): a bad tensor raises ``ValueError`` here, before any
   request or weight is touched, so the engine keeps serving exactly as before;
2. **settle** the requests in flight, by ``in_flight``:

   * ``"finish"`` (default): run them to completion on the old weights. No rollout ever
     spans two versions, and a request preempted earlier resumes on the weights that
     made its first tokens. Finished rollouts come back from the next ``step()``.
   * ``"abort"``: stop them; they come back from the next ``step()`` with
     ``finish_reason="abort"`` and the tokens they had.
   * ``"continue"``: keep them. Each is retracted (its routes so far snapshot into the
     request, its KV dropped) and resumes after the update: its context is recomputed
     by the new weights, the routes of the tokens it already had stay those that sampled
     them (so old logprobs are never paired with new routes, miles #3277), and
     ``Rollout.output_weight_versions`` records, per output token, the version that
     sampled it;
3. **copy** each tensor into its slice of the engine's existing storage (never a rebind,
   so captured CUDA graphs stay valid);
4. **flush** the prefix cache and the route host cache: no KV, route or logprob computed
   with old weights can serve a request made after the update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from rollout.engine.models.loader import layout_for
from rollout.engine.weights import WeightLayout, engine_tensors
from rollout.routed_experts import sentinel_for

if TYPE_CHECKING:
    from rollout.engine.engine import Engine

Version = Union[int, str]
IN_FLIGHT_MODES = ("finish", "abort", "continue")
INITIAL_VERSION: Version = 0


def check_version(version: object) -> Version:
    if isinstance(version, bool) or not isinstance(version, (int, str)) or version == "":
        raise ValueError(f"version must be an int or a non-empty str, got {version!r}")
    return version


class WeightSync:
    """The engine's weight version, the version of every unfinished request's tokens, and updates."""

    def __init__(self) -> None:
        self.version: Version = INITIAL_VERSION
        # rid -> [(number of output tokens before this version, version)], in order
        self._marks: dict[int, list[tuple[int, Version]]] = {}
        self._layout: WeightLayout | None = None

    # ------------------------------------------------------------ versions
    def start(self, rid: int) -> None:
        self._marks[rid] = [(0, self.version)]

    def forget(self, rid: int) -> None:
        """A request dropped without a rollout (``Engine.generate`` raising): nothing to report for it."""
        del self._marks[rid]

    def finish(self, rid: int, num_output: int) -> tuple[Version, list[Version]]:
        """(the version of the rollout, the version of each output token) for a request leaving."""
        marks = self._marks.pop(rid)
        per_token: list[Version] = []
        for (begin, version), (end, _) in zip(marks, marks[1:] + [(num_output, None)]):
            per_token += [version] * (end - begin)
        return (per_token[-1] if per_token else marks[0][1]), per_token

    # ------------------------------------------------------------- updates
    def layout(self, engine: "Engine") -> WeightLayout:
        if self._layout is None:
            w = engine.model.weights
            self._layout = layout_for(engine.model.arch, has_lm_head=w.lm_head is not w.embed)
        return self._layout

    def update(self, engine: "Engine", weights: object, version: object, in_flight: str) -> None:
        if engine._closed:
            raise ValueError("the engine is closed")
        version = check_version(version)
        if in_flight not in IN_FLIGHT_MODES:
            raise ValueError(f"in_flight must be one of {IN_FLIGHT_MODES}, got {in_flight!r}")
        writes = self.layout(engine).plan(weights)  # every check, before anything changes
        _settle(engine, in_flight)
        self.layout(engine).apply(writes, engine_tensors(engine.model.weights))
        flush_caches(engine)
        if in_flight == "continue":
            for rid, r in engine._requests.items():
                self._marks[rid].append((len(r.output_ids), version))
        self.version = version


def flush_caches(engine: "Engine") -> None:
    """Drop every prefix-cache entry and every route row; needs no request holding KV."""
    scheduler = engine.scheduler
    if scheduler.running:
        raise ValueError(f"cannot flush the cache while {len(scheduler.running)} requests hold KV")
    cache = scheduler.prefix_cache
    if cache is not None:
        engine.slots.free(cache.evict(cache.num_cached))
        assert cache.num_cached == 0, "an unlocked prefix cache must evict whole"
    if engine.capture is not None:
        engine.capture.host_cache.fill(sentinel_for(engine.spec.num_experts))


def _settle(engine: "Engine", in_flight: str) -> None:
    """Leave no step in flight and, unless ``continue``, no unfinished request."""
    done = engine._drain() + engine._finish_aborted()
    if in_flight == "abort":
        for rid in list(engine._requests):
            engine.abort(rid)
    if in_flight == "continue":
        for r in reversed(list(engine.scheduler.running)):  # newest first: the queue keeps admission order
            engine.scheduler.preempt(r)
    else:
        while engine.has_unfinished():
            if not engine.scheduler.has_work() and engine._in_flight is None and not engine._aborting:
                raise RuntimeError(f"engine went idle with requests {sorted(engine._requests)} unfinished")
            done += engine.step()
        done += engine._drain()
    engine._undelivered += done
