"""A user factory that hangs in the engine's workers (``placer run --timeout`` must still return in time).

``graph build`` traces :func:`mlp` here; the test then points the graph's ``meta["source"]`` at :func:`hang`, which
the workers call to rebuild the model at start-up."""

from __future__ import annotations

import time

from tests.fixtures_models import mlp  # noqa: F401 -- the factory the graph is built from


def hang():
    """Never returns (a worker stuck at start-up: a lock, a download, a debugger prompt)."""
    time.sleep(3600)
