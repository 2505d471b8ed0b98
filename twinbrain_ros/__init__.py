"""TwinBrainVLA for ROS 2: twin Qwen VLMs joined by AsyMoT, with a DiT flow-matching expert."""

__version__ = "0.1.0"
