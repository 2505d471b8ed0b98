"""ROS 2 nodes (the only layer that imports rclpy and message types)."""
