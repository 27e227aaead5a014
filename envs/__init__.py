"""Gymnasium environments for device placement.

Importing ``envs`` registers ``placer/Placement-v0`` (:class:`envs.placement_env.PlacementEnv`, built from names by
:func:`envs.placement_env.make_env`), so
``gymnasium.make("placer/Placement-v0", graph=..., cluster=...)`` works after ``import envs``.
"""

import gymnasium

ENV_ID = "placer/Placement-v0"

if ENV_ID not in gymnasium.registry:
    # the entry-point string keeps importing envs cheap: the env module loads on the first make()
    gymnasium.register(id=ENV_ID, entry_point="envs.placement_env:make_env")

__all__ = ["ENV_ID"]
