"""Simulation: backends behind one interface, scripted experts, demonstrations, evaluation.

Backends import their simulator lazily (`make_backend`), so this package imports without any.
"""

from .base import (
    BACKENDS,
    DEFAULT_BACKENDS,
    Episode,
    ScriptedExpert,
    SimBackend,
    SimError,
    TargetInterpolator,
    backend_names,
    make_backend,
)

__all__ = [
    "BACKENDS", "DEFAULT_BACKENDS", "Episode", "ScriptedExpert", "SimBackend", "SimError",
    "TargetInterpolator", "backend_names", "make_backend",
]
