"""Closed-loop evaluation: policy episodes on simulated time, success tables, motion metrics.

Above `policy/` (it drives the policy loop) and `sim/` (the simulators it runs), below `ros/`
(whose `evaluate` command runs the same episodes through the robot's topics).
"""
