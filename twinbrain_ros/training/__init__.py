"""Training: the run's configuration, distributed set-up, data, checkpoints and loop.

`ros2 run twinbrain_ros train` (`twinbrain_ros.train`) is the command line.
"""

from .checkpoints import CHECKPOINT_PREFIX, TRAINING_STATE, checkpoint_dirs
from .config import STRATEGIES, DatasetEntry, TrainConfig, load_config
from .data import Collator, build_data
from .loop import build_model, train

__all__ = ["CHECKPOINT_PREFIX", "STRATEGIES", "TRAINING_STATE", "Collator", "DatasetEntry",
           "TrainConfig", "build_data", "build_model", "checkpoint_dirs", "load_config",
           "train"]
