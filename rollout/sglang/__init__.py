"""SGLang side of R3: the ``/generate`` protocol, an HTTP / in-process backend, and multi-turn continuation."""
