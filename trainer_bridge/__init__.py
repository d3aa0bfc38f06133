"""Trainer side of R3: replay rollout routes in transformers MoE models, measure how well they match."""

from __future__ import annotations

from trainer_bridge import metrics
from trainer_bridge.guard import RouteMisalignmentError, RouteMisalignmentWarning
from trainer_bridge.layouts import PackedBatch, PaddedBatch, pack_batch, pad_batch, sequence_routes, unpad_routes
from trainer_bridge.replay import Recording, ReplaySession, record, replay

__all__ = [
    "PackedBatch",
    "PaddedBatch",
    "Recording",
    "ReplaySession",
    "RouteMisalignmentError",
    "RouteMisalignmentWarning",
    "metrics",
    "pack_batch",
    "pad_batch",
    "record",
    "replay",
    "sequence_routes",
    "unpad_routes",
]
