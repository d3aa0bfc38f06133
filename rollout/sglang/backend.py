"""``SGLangBackend``: rollouts with compact routes from an SGLang server (HTTP) or an in-process ``sglang.Engine``.

Both paths build the same ``/generate`` request and decode the same reply
(``rollout.sglang.protocol``), so the trainer side sees one ``Rollout`` format
whichever engine sampled. Over HTTP every prompt is its own request, sent from
a thread pool over keep-alive connections: the server batches them itself,
and one slow prompt does not hold back the others' decoding.

Routes on the wire: a server whose ``/get_model_info`` lists ``"r3"`` in
``routed_experts_formats`` (``r3 serve``) is asked for the compact encoding
(uint8/uint16, MoE layers only, CRC32); any other SGLang sends base64 int32, or
the uint16/uint8 it names in ``meta_info.routed_experts_dtype`` (newer releases
launched with ``SGLANG_ROUTED_EXPERTS_DTYPE``), and ``decode_reply`` reads either.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rollout.moe_spec import MoESpec, read_config
from rollout.sglang.http_client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, HTTPClient
from rollout.sglang.protocol import ROUTES_R3, ROUTES_SGLANG, build_request, decode_reply
from rollout.sglang.weights import SGLangWeights, layout_of
from rollout.types import Rollout, SamplingParams

DEFAULT_CONCURRENCY = 16
GENERATE_PATH = "/generate"


class SGLangBackend:
    """Generate through SGLang and return ``Rollout``s whose routes are already compact.

    ``url`` selects HTTP; ``model_path`` then only supplies ``config.json`` for
    the route shape (or pass ``moe_spec``). Without ``url``, ``model_path`` is
    loaded into an in-process ``sglang.Engine`` (the ``sglang`` extra).
    """

    def __init__(
        self,
        url: str | None = None,
        model_path: str | os.PathLike | None = None,
        return_routed_experts: bool = True,
        *,
        moe_spec: MoESpec | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        concurrency: int = DEFAULT_CONCURRENCY,
        staging_dir: str | os.PathLike | None = None,
        **engine_options: Any,
    ) -> None:
        if url is None and model_path is None:
            raise ValueError("SGLangBackend needs url= (a running SGLang server) or model_path= (in-process engine)")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.return_routed_experts = return_routed_experts
        self._client: HTTPClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._engine: Any = None
        self._routes_format: str | None = None if url is not None else ROUTES_SGLANG
        self._control: SGLangWeights | None = None
        self._config_dir: str | None = str(model_path) if model_path is not None else None
        if url is not None:
            if engine_options:
                raise ValueError(f"engine options {sorted(engine_options)} only apply to the in-process engine")
            self._client = HTTPClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
            self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="sglang-http")
            self._control = SGLangWeights(self._client, staging_dir)
        self.spec = self._resolve_spec(moe_spec, model_path)
        if url is None:
            self._engine = _start_engine(str(model_path), return_routed_experts, engine_options)

    # ---------------------------------------------------------------- public
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
        start_len: int | Sequence[int] = 0,
    ) -> list[Rollout]:
        """One ``Rollout`` per prompt, in order; ``sampling`` and ``start_len`` are one for all or one per prompt."""
        prompts = [list(p) for p in prompts]
        n = len(prompts)
        samplings = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        starts = [int(start_len)] * n if isinstance(start_len, int) else [int(s) for s in start_len]
        if len(samplings) != n or len(starts) != n:
            raise ValueError(f"got {n} prompts but {len(samplings)} sampling params and {len(starts)} start_len values")
        bodies = [
            build_request(p, s, start_len=st, return_routed_experts=self.return_routed_experts,
                          routes_format=self.routes_format)
            for p, s, st in zip(prompts, samplings, starts)
        ]
        if self._engine is not None:
            replies = self._engine_generate(bodies, starts)
        else:
            assert self._client is not None and self._pool is not None
            client = self._client
            replies = list(self._pool.map(lambda body: client.post_json(GENERATE_PATH, body), bodies))
        return [
            decode_reply(r, p, self.spec, start_len=s, routes_requested=self.return_routed_experts)
            for r, p, s in zip(replies, prompts, starts)
        ]

    @property
    def routes_format(self) -> str:
        """``"r3"`` when the server offers compact routes, else SGLang's own; asked once, on first use."""
        if self._routes_format is None:
            assert self._client is not None
            info = self._client.get_json("/get_model_info") or {}
            offered = info.get("routed_experts_formats") if isinstance(info, dict) else None
            self._routes_format = ROUTES_R3 if isinstance(offered, list) and ROUTES_R3 in offered else ROUTES_SGLANG
        return self._routes_format

    # ------------------------------------------------------------ RL verbs
    @property
    def weight_version(self) -> str:
        return self._rl().weight_version

    def update_weights(self, weights: Any, version: int | str, *, in_flight: str = "finish") -> None:
        """Checked against the model's layout, staged as safetensors, loaded by the server (``rollout/sglang/weights.py``)."""
        if self._config_dir is None:
            raise ValueError("update_weights needs model_path= (a directory with the model's config.json) to check tensors")
        self._rl().update_weights(layout_of(read_config(self._config_dir)), weights, version, in_flight=in_flight)

    def update_weights_from_disk(self, model_path: str | os.PathLike, version: int | str, *, in_flight: str = "finish") -> None:
        """Load a checkpoint directory that the server can read."""
        self._rl().update_weights_from_disk(model_path, version, in_flight=in_flight)

    def flush_cache(self) -> None:
        self._rl().flush_cache()

    def pause_generation(self, mode: str = "abort") -> None:
        self._rl().pause_generation(mode)

    def continue_generation(self) -> None:
        self._rl().continue_generation()

    def release_memory(self, weights: bool = False) -> None:
        self._rl().release_memory(weights)

    def resume_memory(self) -> None:
        self._rl().resume_memory()

    def _rl(self) -> SGLangWeights:
        if self._control is None:
            raise ValueError("weight, cache and memory verbs go through a server's endpoints: pass url=")
        return self._control

    def health(self) -> bool:
        """True when the server answers ``/health`` (always True in-process)."""
        if self._client is None:
            return True
        try:
            self._client.get_json("/health")
        except (ValueError, RuntimeError, OSError):
            return False
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def __enter__(self) -> "SGLangBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- internal
    def _resolve_spec(self, moe_spec: MoESpec | None, model_path: str | os.PathLike | None) -> MoESpec | None:
        if moe_spec is not None:
            return moe_spec
        if model_path is not None:
            return MoESpec.from_pretrained(model_path)
        # Over HTTP without a local config: use the server's model path if this machine has it.
        assert self._client is not None
        info = self._client.get_json("/get_model_info") or {}
        served = info.get("model_path")
        if served and os.path.isfile(os.path.join(served, "config.json")):
            self._config_dir = served
            return MoESpec.from_pretrained(served)
        if not self.return_routed_experts:
            return None
        raise ValueError(
            f"cannot tell the route shape: the server's model_path {served!r} is not a local checkpoint; "
            "pass model_path= (a directory with the model's config.json) or moe_spec="
        )

    def _engine_generate(self, bodies: list[dict[str, Any]], starts: list[int]) -> list[dict]:
        """``sglang.Engine.generate`` takes one ``routed_experts_start_len`` per call, so group requests by it."""
        replies: list[dict | None] = [None] * len(bodies)
        for start in sorted(set(starts)):
            idx = [i for i, s in enumerate(starts) if s == start]
            kwargs: dict[str, Any] = dict(
                input_ids=[bodies[i]["input_ids"] for i in idx],
                sampling_params=[bodies[i]["sampling_params"] for i in idx],
                return_logprob=True,
            )
            if self.return_routed_experts:
                kwargs.update(return_routed_experts=True, routed_experts_start_len=start)
            for i, reply in zip(idx, self._engine.generate(**kwargs)):
                replies[i] = reply
        if any(r is None for r in replies):
            raise RuntimeError("sglang.Engine.generate returned fewer replies than prompts")
        return replies  # type: ignore[return-value]


def _start_engine(model_path: str, return_routed_experts: bool, options: dict[str, Any]) -> Any:
    try:
        import sglang
    except ImportError:
        raise ValueError(
            "the in-process SGLang engine needs the sglang extra: pip install 'r3-rollout[sglang]' "
            "(or pass url= for a running server)"
        ) from None
    return sglang.Engine(
        model_path=model_path,
        enable_return_routed_experts=return_routed_experts,
        skip_tokenizer_init=True,
        **options,
    )
