"""Running a node as a process: spin until Ctrl-C or SIGTERM, then shut down cleanly."""

from __future__ import annotations

import signal
import threading


def run_node(factory, name: str, args: list[str] | None = None,
             expected_errors: tuple = (ValueError,)) -> int:
    """Spin the node `factory()` builds until Ctrl-C; returns a process exit code.

    An expected error while building or spinning (bad or out-of-range parameters, a missing
    simulator) is printed as `name: message` with exit code 1 instead of a traceback. Ctrl-C
    and SIGTERM end the node cleanly with exit code 0. Under `ros2 launch` a terminal's Ctrl-C
    reaches the node twice (the terminal's and the one launch forwards): once shutdown has
    begun, further SIGINT/SIGTERM are ignored, so the worker threads are joined and nothing is
    interrupted.
    """
    import rclpy
    from rclpy.exceptions import ParameterException
    from rclpy.executors import ExternalShutdownException

    # rclpy's own handler (installed by init) shuts the context down and then chains to the
    # Python handler that was in place: this one, which ignores every later SIGINT/SIGTERM, so
    # the second Ctrl-C cannot interrupt the shutdown. Before spinning it raises
    # KeyboardInterrupt (a node still loading its model stops at once); while spinning it
    # does not: the shut-down context ends spin with ExternalShutdownException, whereas an
    # exception raised at whatever Python code the main thread was running could land inside
    # rclpy's C++ (a message being converted in take_message) and come out as an unrelated
    # RuntimeError with a traceback.
    _spinning.clear()
    _signalled.clear()
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    node = None
    code = 0
    try:
        rclpy.init(args=args)
        node = factory()
        _spinning.set()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (*expected_errors, ParameterException) as error:
        print(f"{name}: {error}", flush=True)
        code = 1
    except RuntimeError as error:
        # rclpy's handler shuts the context down from its own thread: a spin_once already past
        # its ok() check then fails to build its wait set ("context is not valid"), or a
        # message conversion it was in is cut short. After a signal that is the shutdown
        # itself, not a fault; anything else is raised as it is.
        if not (_signalled.is_set() and not rclpy.ok()):
            raise
        print(f"{name}: shut down ({type(error).__name__} from rclpy while it shut down)",
              flush=True)
    finally:
        _ignore_further_signals()
        _spinning.clear()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


_spinning = threading.Event()
_signalled = threading.Event()


def _interrupt(signum, frame):
    _signalled.set()
    _ignore_further_signals()
    if not _spinning.is_set():
        raise KeyboardInterrupt


def _ignore_further_signals() -> None:
    """Ignore SIGINT/SIGTERM from here on (a pending one is dropped with its handler)."""
    for _ in range(3):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except KeyboardInterrupt:  # a second Ctrl-C landed before the handlers changed
            continue
