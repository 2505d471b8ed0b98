"""Remote inference: a policy server on the GPU machine and its robot-side client.

No rclpy here. The client side (`protocol`, `client`) imports no torch either, so a robot
computer needs only the ROS side of the package.
"""
