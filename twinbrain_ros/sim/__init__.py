"""Simulation: backends behind one interface, scripted experts, demonstrations, evaluation.

Backends import their simulator lazily (`make_backend`), so this package imports without any.

Cameras render offscreen: on Linux MuJoCo uses EGL unless the user chose another OpenGL
backend. MuJoCo reads `MUJOCO_GL` once, when it is first imported, so it is set here, before
any backend module imports it (GLFW, its default, needs a display).
"""

import os
import sys

if sys.platform.startswith("linux"):
    os.environ.setdefault("MUJOCO_GL", "egl")


from .base import (  # noqa: E402 - after MUJOCO_GL
    BACKENDS,
    DEFAULT_BACKENDS,
    Episode,
    ScriptedExpert,
    SimBackend,
    SimError,
    backend_names,
    make_backend,
)

__all__ = [
    "BACKENDS", "DEFAULT_BACKENDS", "Episode", "ScriptedExpert", "SimBackend", "SimError",
    "backend_names", "make_backend",
]
