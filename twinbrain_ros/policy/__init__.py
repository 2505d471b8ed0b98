"""Policy runtime without ROS: observation -> model -> action chunk."""
