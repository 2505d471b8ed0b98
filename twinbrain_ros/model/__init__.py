"""Pure PyTorch + transformers model code: backbones, AsyMoT, state encoder, action expert.

Nothing in this package imports ROS, simulators or dataset code.
"""
