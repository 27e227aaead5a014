"""placer: reinforcement-learning device placement for PyTorch training steps.

Kept light on purpose: importing ``placer`` must not import the upper layers (envs, policies, train, cli).
"""

__version__ = "0.1.0"
