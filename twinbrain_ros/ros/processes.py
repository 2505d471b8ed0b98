"""Starting and stopping this package's nodes as processes (evaluation and the demo).

`ros2 launch` is the way to start nodes on a ROS install; these helpers do the same wiring for
tools that must also run where only the ROS Python wheels exist: each node runs as
`python -m twinbrain_ros.ros.<node> --ros-args ...` in its own process group, and stops on one
SIGINT like under `ros2 launch`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path


def ros_environment(log_dir: Path | None = None) -> dict[str, str]:
    """Environment for child nodes: a domain id, local discovery and a log directory.

    Values already set by the user are kept; the chosen domain and discovery range are also
    put into this process's environment so that its own rclpy context joins the same domain.
    """
    env = dict(os.environ)
    env.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 200)))
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if log_dir is not None:
        env.setdefault("ROS_LOG_DIR", str(log_dir))
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE"):
        if key in env:
            os.environ[key] = env[key]
    return env


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def start_node(module: str, env: dict[str, str], params: dict | None = None,
               params_file: Path | None = None, log_path: Path | None = None
               ) -> subprocess.Popen:
    """Start `twinbrain_ros.ros.<module>` with ROS parameters, output to `log_path` if given.

    String parameters are passed as YAML strings so that values like "true" or "1" stay
    strings.
    """
    command = [sys.executable, "-m", f"twinbrain_ros.ros.{module}", "--ros-args"]
    if params_file is not None:
        command += ["--params-file", str(params_file)]
    for name, value in (params or {}).items():
        text = f"'{value}'" if isinstance(value, str) else _value(value)
        command += ["-p", f"{name}:={text}"]
    output = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        output = open(log_path, "w")  # noqa: SIM115 - handed to the child process
    try:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT
                                if output is not None else None, start_new_session=True)
    finally:
        if output is not None:
            output.close()


def stop_node(process: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    """SIGINT the node's process group, then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass
    return process.returncode
