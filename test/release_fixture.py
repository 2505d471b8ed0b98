"""Weights for the released-checkpoint fixtures, made from their key names and shapes alone.

A fixture in `test/fixtures/release/` records the state-dict layout that the authors' code
creates (`keys.json`: name -> shape), their inputs and their outputs. The weights themselves are
not stored: both the script that ran their code and our tests write the same file from the
layout with `write_release_weights`, so a fixture stays a few kilobytes. Every tensor is drawn
from a generator seeded by its own name: a norm's scale around 1, a bias or a 1-D vector small,
a matrix scaled by its fan-in.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import yaml

FIXTURES = Path(__file__).parent / "fixtures" / "release"


def release_tensor(name: str, shape: list[int]) -> np.ndarray:
    """The fixture's value of the tensor `name` (float32)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = tuple(int(s) for s in shape)
    values = rng.standard_normal(shape)
    if len(shape) == 1:
        values = (1.0 + 0.1 * values) if "norm" in name else 0.02 * values
    elif len(shape) >= 2:
        values = values / np.sqrt(max(1, int(np.prod(shape[1:]))))
    return values.astype(np.float32)


def release_state_dict(layout: dict[str, list[int]]) -> dict:
    """name -> torch tensor for every entry of a `keys.json` layout."""
    import torch

    return {name: torch.from_numpy(release_tensor(name, shape)) for name, shape in layout.items()}


def write_release_weights(fixture: str | Path, out: str | Path, edit=None) -> Path:
    """Write the fixture's weights where its checkpoint file goes, as their trainer saves it.

    `out` is the run directory; the file is `out/checkpoints/steps_0_pytorch_model.pt`
    (`torch.save` of the state dict). `edit(state_dict)` returns the state dict to save instead.
    """
    import torch

    layout = json.loads((Path(fixture) / "keys.json").read_text())
    state = release_state_dict(layout)
    path = Path(out) / "checkpoints" / "steps_0_pytorch_model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(edit(state) if edit else state, path)
    return path


def release_run(name: str, out: Path, edit_config=None, edit_stats=None,
                edit_weights=None) -> Path:
    """A run directory as starVLA publishes it, from fixture `name` (optionally edited).

    `edit_config(config)` and `edit_stats(stats)` change the dicts in place;
    `edit_weights(state_dict)` returns the state dict to save.
    """
    fixture = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((fixture / "config.yaml").read_text())
    stats = json.loads((fixture / "dataset_statistics.json").read_text())
    if edit_config:
        edit_config(config)
    if edit_stats:
        edit_stats(stats)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    (out / "dataset_statistics.json").write_text(json.dumps(stats))
    write_release_weights(fixture, out, edit_weights)
    return out


def release_base(backbone: str | Path, out: str | Path) -> Path:
    """A base VLM directory for a released run: a tiny backbone's config, tokenizer and chat
    template, and its image processor with max pixels 224 x 224, so that a 224x224 frame is not
    resized (as with the released full-size processors); no weights (a release does not read
    them)."""
    import shutil

    backbone, out = Path(backbone), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for file in backbone.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    processor["size"]["longest_edge"] = 224 * 224
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out
