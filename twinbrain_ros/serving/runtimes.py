"""The runtime a robot's policy runs on: a local checkpoint or a policy server.

A local `PolicyRuntime` (torch, transformers) is imported only when a checkpoint is opened; a
`RemoteRuntime` needs neither, so that a robot computer can run the node without them.
"""

from __future__ import annotations


def open_runtime(embodiment, *, checkpoint: str = "", server: str = "",
                 server_token_file: str = "", server_timeout_s: float = 1.0,
                 image_transport: str = "jpeg", jpeg_quality: int = 90,
                 backbone_path: str = "", device: str = "auto", inference: str = "auto",
                 seed: int = -1, max_instruction_tokens: int = 128,
                 max_question_tokens: int = 256, ask_timeout_s: float = 120.0, log=None):
    """The runtime the settings name (the policy node's parameters of the same names).

    Args:
        embodiment: the robot.
        checkpoint: a checkpoint directory (when no `server` is given): ours, or a released
            starVLA run (`twinbrain_ros.policy.release_runtime`).
        server: HOST:PORT of a policy server.
        server_token_file: the file holding the token the server requires ("": none).
        server_timeout_s: a server's reply later than this is given up.
        image_transport: jpeg or png (frames to the server).
        jpeg_quality: JPEG quality of the frames sent.
        backbone_path: override of the checkpoint's backbone directory.
        device: auto, cpu, cuda or cuda:N.
        inference: auto, eager or compiled.
        seed: seed of the flow-matching noise (-1: fresh noise every chunk).
        max_instruction_tokens: the longest instruction.
        max_question_tokens: the longest question to the Left Brain.
        ask_timeout_s: how long a question to a server may take.
        log: called with progress lines.

    Raises:
        ValueError: neither a checkpoint nor a server, a bad transport, or a checkpoint or
            server that does not fit the robot (the message says what differs).
    """
    noise_seed = None if seed < 0 else int(seed)
    if server:
        from .client import RemoteRuntime
        from .protocol import read_token

        if image_transport not in ("jpeg", "png"):
            raise ValueError(f"image_transport must be jpeg or png, got {image_transport!r}")
        token = read_token(server_token_file) if server_token_file else None
        return RemoteRuntime(server, embodiment, token=token, timeout_s=float(server_timeout_s),
                             ask_timeout_s=float(ask_timeout_s), image_format=image_transport,
                             jpeg_quality=int(jpeg_quality), seed=noise_seed, log=log)
    if not checkpoint:
        raise ValueError("parameter 'checkpoint' is required (a checkpoint directory), or "
                         "'server' (HOST:PORT of a policy server)")
    from ..policy.runtime import local_runtime

    return local_runtime(checkpoint, embodiment, device=device,
                         backbone_path=backbone_path or None, seed=noise_seed,
                         inference=inference, max_instruction_tokens=int(max_instruction_tokens),
                         max_question_tokens=int(max_question_tokens), log=log)
