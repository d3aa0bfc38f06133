"""The built-in rollout engine: continuous batching over a KV-slot pool, overlap
scheduling, and routed-experts capture that survives prefix reuse and preemption.

Read in this order: ``config`` (knobs), ``kvcache`` (slots, prefix cache),
``capture`` (routes), ``sampler``, ``scheduler`` (what runs next), ``batch``
(host plan -> device tensors), ``models`` (the forward), ``engine`` (the loop),
``cuda_graph`` (decode replay on CUDA). ``kernels`` holds the Triton kernels.
"""
