"""What crosses between a robot and the model, in NumPy only (no torch, no ROS).

`EmbodimentSpec` (the sizes and names a checkpoint records), the normalization statistics,
real-time chunking's prefix and weights, and `EmbodimentTransforms` (raw vectors in and out of
the model). `robot/` and `model/` both build on these; neither imports the other.
"""

from .model_io import EmbodimentTransforms
from .normalization import EmbodimentNormStats, NormStats
from .rtc import RTC_SCHEDULES, ChunkPrefix, rtc_weights
from .spec import EmbodimentSpec

__all__ = ["RTC_SCHEDULES", "ChunkPrefix", "EmbodimentNormStats", "EmbodimentSpec",
           "EmbodimentTransforms", "NormStats", "rtc_weights"]
