"""Command-line tools (`ros2 run twinbrain_ros <tool>`)."""
