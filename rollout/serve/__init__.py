"""``r3 serve``: the built-in engine behind SGLang's ``/generate`` protocol (FastAPI on uvicorn, one engine-loop thread)."""
