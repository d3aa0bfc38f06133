"""``r3 serve``: the built-in engine behind SGLang's ``/generate`` protocol (stdlib HTTP, one engine-loop thread)."""
