"""SGLang side of R3.

* ``protocol``: SGLang's ``/generate`` request and reply, both directions (client decode, ``r3 serve`` encode);
* ``http_client``: keep-alive JSON over HTTP with retries and timeouts (stdlib);
* ``backend``: ``SGLangBackend`` (HTTP server or in-process ``sglang.Engine``) -> ``Rollout`` with compact routes;
* ``multiturn``: continue a conversation with ``routed_experts_start_len`` and append the new route rows.
"""
