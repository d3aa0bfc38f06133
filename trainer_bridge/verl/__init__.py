"""verl integration: R3 / R2 for verl's FSDP engine, and verl's batch fields from this project's rollouts.

The plugin lives in :mod:`trainer_bridge.verl.plugin` and activates on import;
verl imports it from config (``actor_rollout_ref.model.external_lib=trainer_bridge.verl.plugin``).
Importing this package does not import verl: the layout helpers need only torch.
"""

from __future__ import annotations

from trainer_bridge.verl.fields import rollouts_to_verl_fields
from trainer_bridge.verl.layout import check_verl_routes, routes_from_nested, routes_from_padded, to_verl_layers

__all__ = ["check_verl_routes", "rollouts_to_verl_fields", "routes_from_nested", "routes_from_padded", "to_verl_layers"]
