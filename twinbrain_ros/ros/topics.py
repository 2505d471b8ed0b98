"""Topic names and QoS that several nodes of the package share."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

# The policy node publishes here once its model is loaded (and compiled) and it plans; latched,
# so that a node started before or after it learns it (the sim bridge waits for it).
READY_TOPIC = "/policy/ready"
READY_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)
