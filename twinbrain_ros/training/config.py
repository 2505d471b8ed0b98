"""A training run's configuration: `TrainConfig`, from a YAML file and `key=value` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DatasetEntry:
    """One LeRobot dataset of the training mixture."""

    path: str
    embodiment: str
    weight: float = 1.0


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML file + `key=value` overrides (see `load_config`)."""

    backbone_path: str = ""
    datasets: list[DatasetEntry] = field(default_factory=list)
    output_dir: str = "runs/twinbrain"
    brain_mode: str = "twin"
    horizon: int = 16
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    max_state_dim: int = 32
    max_action_dim: int = 32
    action_expert: dict = field(default_factory=dict)  # ActionExpertConfig overrides
    freeze_right_vision: bool = False
    left_visibility: str = "all"    # Left tokens a Right token sees: all | causal (authors' code)
    batch_size: int = 8             # per process
    flow_draws_per_sample: int = 4  # flow-matching (noise, time) draws per brain pass
    ema_decay: float = 0.0          # moving average of the trainable weights (0: none)
    steps: int = 40000
    lr_right: float = 1e-5          # Right Brain (paper: 1e-5)
    lr_expert: float = 1e-4         # action expert and state encoders
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 500
    grad_clip: float = 1.0
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32
    left_dtype: str = "auto"        # frozen Left Brain weights: auto (bf16 when autocasting
                                    # to bf16, else fp32), bf16, fp32
    activation_checkpointing: bool = False
    strategy: str = "ddp"           # ddp | fsdp
    num_workers: int = 2
    cache_images: bool = False      # decode each episode's images once and keep them in memory
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    resume: bool = False

    def __post_init__(self):
        """Convert values to the fields' types (naming a key that cannot be) and check them."""
        for f in fields(self):
            if f.name != "datasets":
                setattr(self, f.name, _convert(f.name, getattr(self, f.name), f.type))
        if not isinstance(self.datasets, list):
            raise ValueError(f"datasets must be a list of {{path, embodiment, weight}}, got "
                             f"{self.datasets!r}")
        entries = []
        for d in self.datasets:
            if isinstance(d, DatasetEntry):
                entries.append(d)
                continue
            if not isinstance(d, dict) or set(d) - {"path", "embodiment", "weight"} or \
                    not {"path", "embodiment"} <= set(d):
                raise ValueError(f"datasets: each entry needs path and embodiment (and an "
                                 f"optional weight), got {d!r}")
            entries.append(DatasetEntry(path=_convert("datasets.path", d["path"], "str"),
                                        embodiment=_convert("datasets.embodiment",
                                                            d["embodiment"], "str"),
                                        weight=_convert("datasets.weight",
                                                        d.get("weight", 1.0), "float")))
        self.datasets = entries
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r} is not auto, bf16 or fp32")
        if self.left_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"left_dtype {self.left_dtype!r} is not auto, bf16 or fp32")
        if self.batch_size < 1 or self.steps < 1 or self.flow_draws_per_sample < 1:
            raise ValueError("batch_size, steps and flow_draws_per_sample must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_decay > 0 and self.strategy == "fsdp":
            raise ValueError("ema_decay is not supported with strategy fsdp (the average "
                             "would not be sharded): use ddp, or ema_decay=0")


_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def _convert(key: str, value, annotation: str):
    """`value` as the type named by a field annotation (`float`, `list[int]`, ...).

    YAML reads `1e-4` as a string (it wants `1.0e-4`) and `5` where a float is meant: both are
    converted. A value that does not convert is refused with the key named.
    """
    annotation = str(annotation).replace(" ", "")
    if annotation.startswith("list["):
        inner = annotation[len("list["):-1]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list of {inner}, got {value!r}")
        return [_convert(key, v, inner) for v in value]
    if annotation == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return value
    kind = _SCALARS.get(annotation)
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config key {key!r} must be a string, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} must be {annotation_article(annotation)}, got "
                         f"{value!r}") from None
    if kind is int:
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return int(number)
    if not math.isfinite(number):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    return number


def annotation_article(annotation: str) -> str:
    """'an int' / 'a float' for messages."""
    return {"int": "an integer", "float": "a number"}.get(annotation, annotation)


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """Read the YAML config, then apply `key=value` overrides (values parsed as YAML).

    Dotted keys reach into dicts, e.g. `action_expert.hidden_size=256`.
    """
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read the training config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of training config keys")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}")
    return TrainConfig(**data)
