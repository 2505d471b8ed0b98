"""The robot side of remote inference: a policy server client that imports no torch.

`PolicyClient` speaks the protocol (`twinbrain_ros.serving.protocol`) over one websocket, one
request at a time, from the thread that calls it. `RemoteRuntime` gives the policy node the
interface of a local `PolicyRuntime` (`infer`, `check_instruction`, `identity`): camera frames
are resized to the model's input size here and sent JPEG- or PNG-encoded; the contract of the
server is checked against the robot (the same check, and message, as for a local checkpoint);
a server that is down, restarting or late makes `infer` raise a cause-keyed error at once
(`server_unreachable`, `server_timeout`, ...), which the node turns into a hold, and the next
calls reconnect with a doubling back-off (0.5 s up to 5 s). Replies that come after their
timeout are dropped.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import numpy as np

from ..errors import CausedError, refuse_long_text, shorten
from ..policy.contract import ActionChunk, check_contract
from .protocol import PROTOCOL_VERSION, ProtocolError, encode_image, pack, resize, unpack

BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 5.0)


class ServerError(CausedError, RuntimeError):
    """The server could not answer (unreachable, late) or answered with an error."""


class PolicyClient:
    """A synchronous connection to a policy server (see the module docstring)."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 1.0,
                 connect_timeout_s: float = 3.0, name: str = "twinbrain_ros client",
                 max_message_mb: float = 16.0):
        """Prepare (not open) a connection to `address` ("HOST:PORT" or a ws:// URL)."""
        self.url = address if address.startswith(("ws://", "wss://")) else f"ws://{address}"
        self.address = address
        self.token, self.name = token, name
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.max_bytes = int(max_message_mb * 2**20)
        self._connection = None
        self._next_id = 0
        self.server: dict = {}
        self.contracts: dict = {}

    @property
    def connected(self) -> bool:
        """Whether a connection is open."""
        return self._connection is not None

    def connect(self) -> dict:
        """Open the connection and shake hands; returns the server's contracts.

        Raises:
            ServerError: unreachable (`server_unreachable`), refused (the server's cause, e.g.
                `unauthorized`) or speaking another protocol version (`bad_version`).
        """
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        self.close()
        try:
            # legacy=True: a connection held across calls, not a context manager.
            connection = connect(self.url, open_timeout=self.connect_timeout_s,
                                 close_timeout=1.0, max_size=self.max_bytes, compression=None,
                                 legacy=True)
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ServerError("server_unreachable", f"cannot reach the policy server at "
                                                    f"{self.address}: {exc}") from exc
        try:
            connection.send(pack({"type": "hello", "version": PROTOCOL_VERSION,
                                  "token": self.token, "client": self.name}))
            reply = unpack(connection.recv(timeout=self.connect_timeout_s))
        except (OSError, TimeoutError, WebSocketException, ProtocolError) as exc:
            connection.close()
            raise ServerError("server_unreachable", f"no handshake with {self.address}: "
                                                    f"{exc}") from exc
        if reply["type"] == "error":
            connection.close()
            raise ServerError(str(reply.get("cause", "refused")),
                              f"the policy server at {self.address} refused the connection: "
                              f"{reply.get('message', '')}")
        if reply["type"] != "welcome" or reply.get("version") != PROTOCOL_VERSION:
            connection.close()
            raise ServerError("bad_version", f"the policy server at {self.address} speaks "
                                             f"protocol {reply.get('version')!r}, this client "
                                             f"{PROTOCOL_VERSION}")
        self._connection = connection
        self.server = dict(reply.get("server") or {})
        self.contracts = dict(reply.get("contracts") or {})
        return self.contracts

    def request(self, message: dict) -> dict:
        """Send one message with a fresh id and wait for its reply (older replies are dropped).

        Raises:
            ServerError: `server_unreachable` (no connection, or it broke), `server_timeout`
                (no reply within `timeout_s`; the connection stays open), or the cause of the
                server's error reply.
        """
        from websockets.exceptions import WebSocketException

        if self._connection is None:
            raise ServerError("server_unreachable", f"not connected to {self.address}")
        self._next_id += 1
        message = {**message, "id": self._next_id}
        deadline = time.monotonic() + self.timeout_s
        try:
            self._connection.send(pack(message))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerError("server_timeout", f"no reply from {self.address} within "
                                                        f"{self.timeout_s:.3f} s")
                reply = unpack(self._connection.recv(timeout=remaining))
                if reply.get("id") == self._next_id or reply.get("id") is None:
                    break  # anything older is a late reply to a request given up on
        except TimeoutError as exc:
            raise ServerError("server_timeout", f"no reply from {self.address} within "
                                                f"{self.timeout_s:.3f} s") from exc
        except (OSError, WebSocketException) as exc:
            self.close()
            raise ServerError("server_unreachable", f"lost the connection to {self.address}: "
                                                    f"{exc}") from exc
        except ProtocolError as exc:
            raise ServerError("bad_reply", f"unreadable reply from {self.address}: {exc}"
                              ) from exc
        if reply["type"] == "error":
            raise ServerError(str(reply.get("cause", "server_error")),
                              f"policy server: {reply.get('message', '')}")
        return reply

    def close(self) -> None:
        """Close the connection (if open)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - it is going away either way
                pass


class RemoteRuntime:
    """The policy node's runtime when the model runs on a policy server.

    Attributes:
        identity: what `/diagnostics` shows of the model: the server, its identity, the link
            state, the round-trip time.
    """

    def __init__(self, address: str, embodiment, token: str | None = None,
                 timeout_s: float = 1.0, image_format: str = "jpeg", jpeg_quality: int = 90,
                 seed: int | None = None, ask_timeout_s: float = 120.0, log=None):
        """Connect and check the server's contract against `embodiment`.

        Raises:
            ValueError: the server serves no policy for this robot, or one that does not fit it
                (the message is the one a local checkpoint gets), or it refused this client.
        """
        self.embodiment, self.key = embodiment, embodiment.normalization_key
        self.image_format, self.jpeg_quality = image_format, int(jpeg_quality)
        self.seed = seed
        self.log = log or (lambda text: None)
        self.client = PolicyClient(address, token=token, timeout_s=timeout_s,
                                   name=f"policy_node {embodiment.name}")
        # Questions go over a connection of their own: an answer takes longer than a chunk,
        # and the server serves one message per connection at a time.
        self.ask_client = PolicyClient(address, token=token, timeout_s=ask_timeout_s,
                                       name=f"policy_node {embodiment.name} (questions)")
        self.contract: dict | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.round_trips: deque[float] = deque(maxlen=100)
        self.last_batch = 0   # how many requests the server's last forward pass held
        self.last_server_s = 0.0  # the server's model time for the last chunk
        self.identity = {"server": address, "link": "connecting"}
        self.inference_state = "remote"
        try:
            self._connect()
        except ServerError as error:
            if error.cause != "server_unreachable":
                raise ValueError(str(error)) from error
            self._failed(error)
            self.log(f"policy server {address} is not reachable yet ({error}); the robot holds "
                     "until it is")

    def _connect(self) -> None:
        contracts = self.client.connect()
        self.contract = check_contract(contracts, self.embodiment,
                                       f"policy server {self.client.address}", warn=self.log)
        self._failures, self._retry_at = 0, 0.0
        self.identity.update({"link": "connected",
                              "server_identity": ", ".join(f"{k}={v}" for k, v in
                                                           self.client.server.items())})

    def _failed(self, error: ServerError) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + BACKOFF_S[min(self._failures, len(BACKOFF_S)) - 1]
        self.identity["link"] = f"down: {error.cause}"

    @property
    def protocol(self) -> dict | None:
        """The loop settings a released checkpoint's server asks for.

        None for our checkpoints, and while the server has not been reached.
        """
        return (self.contract or {}).get("protocol")

    def check_instruction(self, instruction: str, max_tokens: int) -> int:
        """Local checks (length, the prompt's special tokens); the server counts the tokens."""
        limit = min(max_tokens, (self.contract or {}).get("max_instruction_tokens", max_tokens))
        refuse_long_text(instruction, limit, error=ServerError)
        specials = [t for t in (self.contract or {}).get("special_tokens", []) if t in instruction]
        if specials:
            raise ServerError("instruction_special_tokens", f"instruction contains the special "
                                                            f"tokens {specials[:3]}: "
                                                            f"{shorten(repr(instruction))}")
        return 0

    @property
    def horizon(self) -> int | None:
        """Actions per chunk of the served policy (None before the first handshake)."""
        return None if self.contract is None else int(self.contract["horizon"])

    def infer(self, observation, prefix=None) -> ActionChunk:
        """Send one observation and return its chunk; `ServerError` when there is none.

        `prefix` (a `ChunkPrefix`): real-time chunking, done on the server.
        """
        if not self.client.connected:
            if time.monotonic() < self._retry_at:
                raise ServerError("server_unreachable", f"policy server {self.client.address} "
                                                        "is down; retrying")
            try:
                self._connect()
                self.log(f"connected to the policy server {self.client.address}")
            except ServerError as error:
                self._failed(error)
                if error.cause != "server_unreachable":  # e.g. a new server with another policy
                    raise ServerError(error.cause if error.cause != "refused"
                                      else "server_refused", str(error)) from error
                raise
            except ValueError as error:  # the server now serves a policy for another robot
                self.client.close()
                self._failed(ServerError("contract_mismatch", str(error)))
                raise ServerError("contract_mismatch", str(error)) from error
        size = tuple(self.contract["image_size"])
        images = [encode_image(resize(np.asarray(image, dtype=np.uint8), size),
                               self.image_format, self.jpeg_quality)
                  for image in observation.images]
        start = time.perf_counter()
        try:
            reply = self.client.request({
                "type": "infer", "embodiment": self.key, "images": images,
                "image_format": self.image_format,
                "state": np.asarray(observation.state, dtype=np.float64),
                "instruction": observation.instruction, "seed": self.seed,
                "prefix": None if prefix is None else {
                    "actions": np.asarray(prefix.actions, dtype=np.float32),
                    "frozen": int(prefix.frozen), "schedule": prefix.schedule}})
        except ServerError as error:
            if error.cause == "server_unreachable":
                self._failed(error)
            raise
        elapsed = time.perf_counter() - start
        self.last_batch = int(reply.get("batch", 1))
        self.last_server_s = float(reply.get("server_s", 0.0))
        self.round_trips.append(elapsed)
        self.identity["rtt_median_ms"] = f"{statistics.median(self.round_trips) * 1000:.1f}"
        self.identity["link"] = "connected"
        actions = np.asarray(reply["actions"], dtype=np.float64)
        expected = (self.contract["horizon"], self.embodiment.action_dim)
        if actions.shape != expected:
            raise ServerError("bad_reply", f"the server returned actions of shape "
                                           f"{actions.shape}, expected {expected}")
        return ActionChunk(actions=actions, latency_s=elapsed)

    def ask(self, images: list, question: str, max_new_tokens: int) -> dict:
        """Have the server's Left Brain answer `question` about `images` (blocking).

        Returns the server's answer message (`answer`, `tokens`, `finish`, `server_s`).

        Raises:
            ServerError: unreachable, late (`ask_timeout_s`) or the server's cause (e.g.
                `no_left_brain`, `question_too_long`).
        """
        if not self.ask_client.connected:
            self.ask_client.connect()
        size = tuple(self.contract["image_size"]) if self.contract else None
        encoded = [encode_image(np.asarray(image, dtype=np.uint8) if size is None else
                                resize(np.asarray(image, dtype=np.uint8), size),
                                self.image_format, self.jpeg_quality) for image in images]
        reply = self.ask_client.request({"type": "ask", "images": encoded,
                                         "image_format": self.image_format,
                                         "question": question,
                                         "max_new_tokens": int(max_new_tokens),
                                         "timeout_s": self.ask_client.timeout_s})
        if reply.get("type") != "answer" or not isinstance(reply.get("answer"), str):
            raise ServerError("bad_reply", f"the server answered a question with "
                                           f"{shorten(repr(reply.get('type')), 40)}")
        return reply

    def close(self) -> None:
        """Close the connections."""
        self.client.close()
        self.ask_client.close()
