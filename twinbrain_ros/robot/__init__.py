"""What a robot is: its description, its action spaces and its kinematics. No torch, no ROS.

- `embodiment`: `Embodiment`, one YAML file per robot in `config/`, read by every layer;
- `action_spaces`: one object per action convention (`joint_position`, `ee_delta`) that encodes
  joint motion into actions and decodes actions into joint targets;
- `kinematics`: the arm models those conventions need (Pinocchio, imported on first use).
"""
