"""Atomic checkpoints: a failure during a save leaves the previous checkpoint loadable."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from launch import checkpoint


@pytest.fixture()
def pg():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _state(v: float):
    return {"model": {"w": torch.full((3, 2), v)}, "optim": {"lr": torch.tensor(v)}}


def test_save_load_roundtrip_restores_rng_and_keeps_last_k(tmp_path, pg):
    for step, v in ((1, 1.0), (2, 2.0), (3, 3.0)):
        torch.manual_seed(step)
        checkpoint.save(tmp_path, step, _state(v), checkpoint.CheckpointMeta(step, 1, step * 8), keep=2)
    expected_next = torch.rand(4)  # RNG continues from seed 3 here, as at the save of step 3
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    path = checkpoint.latest(tmp_path)
    assert path is not None and path.name == "step_00000003"
    torch.manual_seed(123)
    state = _state(0.0)
    meta = checkpoint.load(path, state)
    assert meta.step == 3 and meta.samples_seen == 24
    assert torch.equal(state["model"]["w"], torch.full((3, 2), 3.0))
    assert torch.equal(torch.rand(4), expected_next)


def test_failure_during_save_keeps_previous_checkpoint(tmp_path, pg, monkeypatch):
    checkpoint.save(tmp_path, 5, _state(5.0), checkpoint.CheckpointMeta(5, 1, 40), keep=2)

    def dies(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint.dcp, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 10, _state(10.0), checkpoint.CheckpointMeta(10, 1, 80), keep=2)
    monkeypatch.undo()
    path = checkpoint.latest(tmp_path)
    assert path is not None and path.name == "step_00000005"
    state = _state(0.0)
    assert checkpoint.load(path, state).step == 5
    assert torch.equal(state["model"]["w"], torch.full((3, 2), 5.0))
    # The next save clears the stale temporary directory.
    checkpoint.save(tmp_path, 11, _state(11.0), checkpoint.CheckpointMeta(11, 1, 88), keep=2)
    assert not list(tmp_path.glob(".tmp_*"))
    assert checkpoint.latest(tmp_path).name == "step_00000011"


def test_world_size_mismatch_is_refused(tmp_path, pg):
    checkpoint.save(tmp_path, 1, _state(1.0), checkpoint.CheckpointMeta(1, 1, 8), keep=1)
    (tmp_path / "step_00000001" / "meta.json").write_text('{"step": 1, "world_size": 2, "samples_seen": 8}')
    with pytest.raises(RuntimeError, match="written by 2 ranks"):
        checkpoint.load(checkpoint.latest(tmp_path), _state(0.0))


def test_a_new_save_is_never_removed_by_cleanup(tmp_path, pg):
    # An older step saved after newer ones (e.g. a second run in the same directory) stays the latest.
    checkpoint.save(tmp_path, 20, _state(20.0), checkpoint.CheckpointMeta(20, 1, 160), keep=2)
    checkpoint.save(tmp_path, 5, _state(5.0), checkpoint.CheckpointMeta(5, 1, 40), keep=1)
    path = checkpoint.latest(tmp_path)
    assert path is not None and path.name == "step_00000005" and path.is_dir()
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000005"]


def test_resuming_on_another_data_stream_is_refused(tmp_path, pg):
    position = {"batch_size": 64, "seed": 0, "train_files": ["a.parquet"]}
    checkpoint.save(tmp_path, 4, _state(4.0), checkpoint.CheckpointMeta(4, 1, 256, None, position), keep=1)
    path = checkpoint.latest(tmp_path)
    assert checkpoint.load(path, _state(0.0), dict(position)).step == 4
    with pytest.raises(RuntimeError, match=r"different data stream \(batch_size: checkpoint 64, now 32; seed"):
        checkpoint.load(path, _state(0.0), dict(position, batch_size=32, seed=7))
