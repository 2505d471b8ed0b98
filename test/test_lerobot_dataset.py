"""LeRobot datasets v2.1 / v3.0: writer -> reader round trips, validation, stats, mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from twinbrain_ros.data.lerobot import DatasetError, LeRobotDataset, LeRobotWriter  # noqa: E402
from twinbrain_ros.data.stats import DatasetMixture, compute_norm_stats  # noqa: E402
from twinbrain_ros.robot.embodiment import Embodiment  # noqa: E402

LENGTHS = (6, 4, 7)
CAMERAS = ("front", "wrist")
VERSIONS = ("v2.1", "v3.0")


@pytest.fixture(scope="module")
def widowx() -> Embodiment:
    return Embodiment.load("widowx")


@pytest.fixture(scope="module")
def gr1() -> Embodiment:
    return Embodiment.load("gr1")


def frames(length: int, camera: int, episode: int, size=(32, 32)) -> np.ndarray:
    """Smooth frames (kind to a lossy codec) that differ clearly from one step to the next."""
    y, x = np.mgrid[:size[0], :size[1]]
    out = [np.stack([x * 4 + t * 12, y * 4 + 16 * (episode + 2 * camera),
                     np.full_like(x, 30 + 25 * t)], axis=-1) for t in range(length)]
    return np.clip(out, 0, 255).astype(np.uint8)


def episode_data(embodiment: Embodiment, length: int, episode: int, cameras=CAMERAS) -> dict:
    rng = np.random.default_rng(episode)
    action = rng.normal(size=(length, embodiment.action_dim)).astype(np.float32)
    for dim in embodiment.binary_action_dims:
        action[:, dim] = rng.integers(0, 2, length)
    return {"images": {cam: frames(length, c, episode) for c, cam in enumerate(cameras)},
            "state": rng.normal(size=(length, embodiment.state_dim)).astype(np.float32),
            "action": action, "task": f"task {episode % 2}: pick the block"}


def write(root: Path, embodiment: Embodiment, version="v3.0", use_videos=True, lengths=LENGTHS,
          cameras=CAMERAS, **kwargs) -> list[dict]:
    writer = LeRobotWriter(root, fps=10, embodiment=embodiment, image_keys=list(cameras),
                           version=version, use_videos=use_videos, **kwargs)
    episodes = [episode_data(embodiment, n, e, cameras) for e, n in enumerate(lengths)]
    for e, episode in enumerate(episodes):
        assert writer.add_episode(**episode) == e
    assert writer.finalize() == root
    return episodes


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("use_videos", [True, False], ids=["video", "parquet_images"])
def test_written_dataset_reads_back(tmp_path, widowx, version, use_videos):
    episodes = write(tmp_path / "ds", widowx, version, use_videos)
    ds = LeRobotDataset(tmp_path / "ds", horizon=3, embodiment=widowx)

    assert (ds.version, ds.fps, ds.num_episodes) == (version, 10.0, 3)
    assert ds.num_frames == len(ds) == sum(LENGTHS)
    assert ds.image_keys == [f"observation.images.{c}" for c in CAMERAS]
    assert ds.tasks == {0: "task 0: pick the block", 1: "task 1: pick the block"}
    np.testing.assert_array_equal(ds.states(), np.concatenate([e["state"] for e in episodes]))
    np.testing.assert_array_equal(ds.actions(), np.concatenate([e["action"] for e in episodes]))
    i = 0
    for e, episode in enumerate(episodes):
        for t in range(len(episode["state"])):
            sample = ds[i]
            assert (sample["episode_index"], sample["frame_index"]) == (e, t)
            assert sample["instruction"] == episode["task"]
            assert sample["embodiment"] == "widowx"
            assert sample["state"].dtype == np.float32
            for c, cam in enumerate(CAMERAS):
                image, written = sample["images"][c], episode["images"][cam]
                assert image.shape == (32, 32, 3) and image.dtype == np.uint8
                errors = [np.abs(image.astype(int) - w).mean() for w in written]
                if use_videos:  # lossy: close to its frame, and closer than to any other
                    assert errors[t] < 4.0 and int(np.argmin(errors)) == t
                else:
                    assert errors[t] == 0
            i += 1


@pytest.mark.parametrize("version", VERSIONS)
def test_files_follow_the_lerobot_layout(tmp_path, widowx, version):
    write(tmp_path / "ds", widowx, version, lengths=(3, 2))
    root = tmp_path / "ds"
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == version and info["fps"] == 10
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (2, 5, 2)
    assert info["features"]["observation.images.front"]["dtype"] == "video"
    assert info["features"]["observation.images.front"]["shape"] == [32, 32, 3]
    assert info["features"]["action"]["shape"] == [7]
    assert info["features"]["observation.state"]["names"] == widowx.joint_names
    if version == "v2.1":
        expected = ["data/chunk-000/episode_000001.parquet",
                    "videos/chunk-000/observation.images.wrist/episode_000001.mp4",
                    "meta/episodes.jsonl", "meta/tasks.jsonl", "meta/episodes_stats.jsonl"]
        lines = (root / "meta/episodes.jsonl").read_text().splitlines()
        assert json.loads(lines[1]) == {"episode_index": 1, "tasks": ["task 1: pick the block"],
                                        "length": 2}
    else:
        expected = ["data/chunk-000/file-000.parquet",
                    "videos/observation.images.wrist/chunk-000/file-000.mp4",
                    "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet"]
        import pyarrow.parquet as pq

        meta = pq.read_table(root / expected[2]).to_pylist()
        assert [m["videos/observation.images.front/from_timestamp"] for m in meta] == [0.0, 0.3]
        assert [(m["dataset_from_index"], m["dataset_to_index"]) for m in meta] == [(0, 3),
                                                                                  (3, 5)]
    for path in expected + ["meta/stats.json"]:
        assert (root / path).is_file(), path
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.tmp"))


def test_v3_files_roll_over_by_size(tmp_path, widowx):
    episodes = write(tmp_path / "ds", widowx, "v3.0", data_file_size_mb=1e-6,
                     video_file_size_mb=1e-6)
    assert len(list((tmp_path / "ds/data").rglob("*.parquet"))) == 3
    assert len(list((tmp_path / "ds/videos/observation.images.front").rglob("*.mp4"))) == 3
    ds = LeRobotDataset(tmp_path / "ds", horizon=2, embodiment=widowx)
    last = ds[len(ds) - 1]["images"][1]
    written = episodes[2]["images"]["wrist"][-1]
    assert np.abs(last.astype(int) - written).mean() < 4.0


def test_action_chunk_is_padded_and_masked_at_episode_end(tmp_path, widowx):
    episodes = write(tmp_path / "ds", widowx, "v3.0", use_videos=False)
    ds = LeRobotDataset(tmp_path / "ds", horizon=4, embodiment=widowx, image_keys=[])
    a0, a1 = episodes[0]["action"], episodes[1]["action"]

    inside = ds[1]
    np.testing.assert_array_equal(inside["actions"], a0[1:5])
    assert inside["action_mask"].tolist() == [True] * 4

    near_end = ds[4]  # episode 0 has 6 frames: steps 4, 5 real, then 5 repeated
    np.testing.assert_array_equal(near_end["actions"], a0[[4, 5, 5, 5]])
    assert near_end["action_mask"].tolist() == [True, True, False, False]
    assert near_end["actions"].shape == (4, 7) and near_end["actions"].dtype == np.float32

    last_of_middle = ds[6 + 3]  # never reaches into episode 2
    np.testing.assert_array_equal(last_of_middle["actions"], a1[[3, 3, 3, 3]])
    assert last_of_middle["action_mask"].tolist() == [True, False, False, False]
    assert ds[-1]["action_mask"].tolist() == [True, False, False, False]
    assert ds[0]["images"] == []
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_images_are_resized_and_selected(tmp_path, widowx):
    write(tmp_path / "ds", widowx, "v2.1", lengths=(2,))
    ds = LeRobotDataset(tmp_path / "ds", horizon=1, embodiment=widowx, image_keys=["wrist"],
                        image_size=(16, 24))
    assert ds.image_keys == ["observation.images.wrist"]
    assert [im.shape for im in ds[1]["images"]] == [(16, 24, 3)]


@pytest.mark.parametrize("version", VERSIONS)
def test_truncated_parquet_is_rejected_at_construction(tmp_path, widowx, version):
    write(tmp_path / "ds", widowx, version, use_videos=False)
    name = "episode_000001.parquet" if version == "v2.1" else "file-000.parquet"
    path = next((tmp_path / "ds/data").rglob(name))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=str(path)):
        LeRobotDataset(tmp_path / "ds", horizon=2, embodiment=widowx)


@pytest.mark.parametrize("version", VERSIONS)
def test_missing_video_is_rejected_at_construction(tmp_path, widowx, version):
    write(tmp_path / "ds", widowx, version)
    videos = sorted((tmp_path / "ds/videos").rglob("*.mp4"))
    victim = [v for v in videos if "wrist" in str(v)][-1]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"{victim}.*missing"):
        LeRobotDataset(tmp_path / "ds", horizon=2, embodiment=widowx)
    # Without the wrist camera the dataset is usable.
    ds = LeRobotDataset(tmp_path / "ds", horizon=2, embodiment=widowx, image_keys=["front"])
    assert len(ds[0]["images"]) == 1


def test_dims_must_match_the_embodiment(tmp_path, widowx, gr1):
    arm6 = Embodiment(name="arm6", joint_names=[f"j{i}" for i in range(6)],
                      joint_lower_limits=[-1.0] * 6, joint_upper_limits=[1.0] * 6,
                      max_joint_step=[0.1] * 6, control_rate_hz=10.0)
    write(tmp_path / "six", arm6, "v2.1", use_videos=False, lengths=(2,))
    with pytest.raises(DatasetError, match="action: dataset has 6 dims, embodiment widowx "
                                           "expects 7"):
        LeRobotDataset(tmp_path / "six", horizon=2, embodiment=widowx)
    write(tmp_path / "wx", widowx, "v3.0", use_videos=False, lengths=(2,))
    with pytest.raises(DatasetError, match="observation.state: dataset has 7 dims, embodiment "
                                           "gr1 expects 29"):
        LeRobotDataset(tmp_path / "wx", horizon=2, embodiment=gr1)


def test_meta_problems_are_named(tmp_path, widowx):
    write(tmp_path / "ds", widowx, "v3.0", use_videos=False, lengths=(2,))
    root = tmp_path / "ds"
    with pytest.raises(DatasetError, match="image key 'top'"):
        LeRobotDataset(root, horizon=2, embodiment=widowx, image_keys=["top"])
    info_path = root / "meta/info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(DatasetError, match="info.json: codebase_version 'v1.6'"):
        LeRobotDataset(root, horizon=2, embodiment=widowx)
    info_path.write_text("{not json")
    with pytest.raises(DatasetError, match="info.json: not valid JSON"):
        LeRobotDataset(root, horizon=2, embodiment=widowx)
    info_path.unlink()
    with pytest.raises(DatasetError, match="info.json: missing"):
        LeRobotDataset(root, horizon=2, embodiment=widowx)


def test_writer_rejects_bad_episodes(tmp_path, widowx):
    writer = LeRobotWriter(tmp_path / "ds", fps=10, embodiment=widowx, image_keys=["front"])
    good = episode_data(widowx, 3, 0, cameras=("front",))
    with pytest.raises(ValueError, match="state: shape"):
        writer.add_episode(**{**good, "state": good["state"][:, :6]})
    with pytest.raises(ValueError, match="images"):
        writer.add_episode(**{**good, "images": {"back": good["images"]["front"]}})
    with pytest.raises(ValueError, match="timestamps: off the 10 fps grid"):
        writer.add_episode(**good, timestamps=np.array([0.0, 0.1, 0.5]))
    writer.add_episode(**good, timestamps=np.array([0.0, 0.1001, 0.2]))
    writer.finalize()
    with pytest.raises(FileExistsError):
        LeRobotWriter(tmp_path / "ds", fps=10, embodiment=widowx, image_keys=["front"])


def test_norm_stats_per_embodiment(tmp_path, widowx, gr1):
    a = write(tmp_path / "wx_a", widowx, "v2.1", use_videos=False, lengths=(30, 20), cameras=())
    b = write(tmp_path / "wx_b", widowx, "v3.0", use_videos=False, lengths=(25,), cameras=())
    c = write(tmp_path / "gr1", gr1, "v3.0", use_videos=False, lengths=(40,), cameras=())
    datasets = [LeRobotDataset(tmp_path / name, horizon=4, embodiment=emb)
                for name, emb in (("wx_a", widowx), ("wx_b", widowx), ("gr1", gr1))]
    stats = compute_norm_stats(datasets)
    assert set(stats) == {"widowx", "gr1"}

    wx_actions = np.concatenate([e["action"] for e in a + b])
    wx = stats["widowx"]
    assert (wx.action.mode, wx.state.mode, wx.action.binary) == ("q01_q99", "q01_q99", [6])
    np.testing.assert_allclose(wx.action.q01, np.quantile(wx_actions, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(wx.action.q99, np.quantile(wx_actions, 0.99, axis=0), rtol=1e-6)
    normalized = wx.action.normalize(wx_actions)
    np.testing.assert_array_equal(normalized[:, 6], wx_actions[:, 6])  # gripper untouched
    assert set(np.unique(normalized[:, 6])) <= {0.0, 1.0}
    assert np.abs(normalized[:, :6]).max() <= 1.0

    g = stats["gr1"]
    gr1_states = np.concatenate([e["state"] for e in c])
    assert (g.action.mode, g.state.mode, g.action.binary) == ("min_max", "min_max", [])
    np.testing.assert_allclose(g.state.min, gr1_states.min(0), rtol=1e-6)
    np.testing.assert_allclose(g.state.max, gr1_states.max(0), rtol=1e-6)
    assert g.action.dim == g.state.dim == 29


def test_mixture_weights_and_seeded_order(tmp_path, widowx, gr1):
    write(tmp_path / "wx", widowx, "v3.0", use_videos=False, lengths=(100, 100), cameras=())
    write(tmp_path / "gr1", gr1, "v3.0", use_videos=False, lengths=(200,), cameras=())
    datasets = [LeRobotDataset(tmp_path / "wx", horizon=2, embodiment=widowx),
                LeRobotDataset(tmp_path / "gr1", horizon=2, embodiment=gr1)]
    mixture = DatasetMixture(datasets, weights=[3.0, 1.0], seed=7)
    assert len(mixture) == 400
    which = np.array([mixture.locate(i)[0] for i in range(len(mixture))])
    assert np.sum(which == 0) == 300 and np.sum(which == 1) == 100
    assert 2.2 < np.sum(which[:100] == 0) / max(1, np.sum(which[:100] == 1)) < 4.5
    assert mixture[0]["embodiment"] == ("widowx", "gr1")[which[0]]

    order = [mixture.locate(i) for i in range(len(mixture))]
    again = DatasetMixture(datasets, weights=[3.0, 1.0], seed=7)
    assert [again.locate(i) for i in range(len(again))] == order
    other = DatasetMixture(datasets, weights=[3.0, 1.0], seed=8)
    assert [other.locate(i) for i in range(len(other))] != order
    # Up-weighted data repeats whole permutations, down-weighted data is subsampled.
    locals0 = [local for d, local in order if d == 0]
    assert np.bincount(locals0, minlength=200).min() >= 1
    # The stream of positions continues into later epochs, each with its own permutation:
    # down-weighted data shows other frames there.
    epoch1 = [mixture.locate(len(mixture) + i) for i in range(len(mixture))]
    assert epoch1 != order and sum(d == 0 for d, _ in epoch1) == 300
    assert [again.locate(len(again) + i) for i in range(len(again))] == epoch1
    assert {j for d, j in epoch1 if d == 1} != {j for d, j in order if d == 1}
    assert mixture.locate(5) == order[5]
    only_first = DatasetMixture(datasets, weights=[1.0, 0.0])
    assert {only_first.locate(i)[0] for i in range(len(only_first))} == {0}
    with pytest.raises(ValueError, match="weights"):
        DatasetMixture(datasets, weights=[1.0, -1.0])


def _first(batch):
    return [(s["episode_index"], s["frame_index"], s["images"]) for s in batch]


def test_video_decoding_in_dataloader_workers(tmp_path, widowx):
    torch = pytest.importorskip("torch")
    write(tmp_path / "ds", widowx, "v3.0")
    ds = LeRobotDataset(tmp_path / "ds", horizon=2, embodiment=widowx)
    expected = [ds[i]["images"] for i in range(len(ds))]  # opens containers in this process
    # The workers are forked after this process opened (and cached) the videos.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_first,
                                         multiprocessing_context="fork", timeout=20)
    seen = [item for batch in loader for item in batch]
    assert len(seen) == len(ds)
    starts = np.cumsum((0,) + LENGTHS)
    for (episode, frame, images) in seen:
        for got, want in zip(images, expected[starts[episode] + frame], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_video_cut_short_is_rejected_at_construction(tmp_path, widowx, version):
    write(tmp_path / "ds", widowx, version)
    videos = sorted((tmp_path / "ds/videos").rglob("*.mp4"))
    victim = videos[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=str(victim)):
        LeRobotDataset(tmp_path / "ds", horizon=2, embodiment=widowx)


@pytest.mark.parametrize("use_videos", [True, False], ids=["video", "parquet_images"])
def test_cached_images_are_the_decoded_ones_and_are_decoded_once(tmp_path, widowx, use_videos):
    import pickle

    write(tmp_path / "ds", widowx, "v3.0", use_videos)
    plain = LeRobotDataset(tmp_path / "ds", horizon=3, embodiment=widowx)
    cached = LeRobotDataset(tmp_path / "ds", horizon=3, embodiment=widowx, cache_images=True)
    order = np.random.default_rng(0).permutation(len(plain))
    for i in order:
        for a, b in zip(plain[i]["images"], cached[i]["images"], strict=True):
            np.testing.assert_array_equal(a, b)
    # A DataLoader worker gets the dataset without its frames (it decodes its own).
    assert cached._frames and pickle.loads(pickle.dumps(cached))._frames == {}

    # Every frame is held now: no decoding any more.
    def no_decoding(*args):
        raise AssertionError("decoded again")

    cached._image = no_decoding
    for i in order:
        assert cached[i]["images"][0].shape == plain[i]["images"][0].shape
