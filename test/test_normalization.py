"""Normalization statistics: the round trip, clipping, binary grippers and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from twinbrain_ros.transforms.normalization import EmbodimentNormStats, NormStats


@pytest.mark.parametrize("mode", ["q01_q99", "min_max", "mean_std"])
def test_round_trip_inside_the_range(mode):
    rng = np.random.default_rng(0)
    data = rng.normal(loc=[0.0, 5.0, -2.0], scale=[1.0, 0.1, 3.0], size=(2000, 3))
    stats = NormStats.from_data(data, mode)
    x = np.quantile(data, [0.2, 0.5, 0.8], axis=0)
    y = stats.normalize(x)
    if mode != "mean_std":
        assert y.min() >= -1 and y.max() <= 1
    np.testing.assert_allclose(stats.unnormalize(y), x, rtol=1e-5, atol=1e-5)


def test_q01_q99_maps_quantiles_to_unit_range_and_clips_outliers():
    data = np.linspace(0, 100, 10001)[:, None]
    stats = NormStats.from_data(data, "q01_q99")
    np.testing.assert_allclose(stats.normalize(np.array([[1.0], [99.0]])), [[-1.0], [1.0]],
                               atol=1e-6)
    np.testing.assert_allclose(stats.normalize(np.array([[-50.0], [500.0]])), [[-1], [1]])


def test_binary_gripper_is_not_scaled_and_is_thresholded_back():
    data = np.stack([np.linspace(-1, 1, 100), np.tile([0.0, 1.0], 50)], axis=1)
    stats = NormStats.from_data(data, "q01_q99", binary=[1])
    assert stats.normalize(np.array([0.0, 1.0]))[1] == 1.0
    out = stats.unnormalize(np.array([[0.0, 0.7], [0.0, 0.2]]))
    assert out[:, 1].tolist() == [1.0, 0.0]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="mode"):
        NormStats.identity(2, mode="zscore")
    with pytest.raises(ValueError, match="non-finite"):
        NormStats.from_data(np.array([[np.nan]]), "min_max")
    with pytest.raises(ValueError, match="last dim 2"):
        NormStats.identity(2).normalize(np.zeros(3))


def test_json_round_trip():
    stats = EmbodimentNormStats(state=NormStats.identity(3), action=NormStats.identity(2))
    assert EmbodimentNormStats.from_dict(stats.to_dict()) == stats
