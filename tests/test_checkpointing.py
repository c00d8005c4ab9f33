"""Checkpoint layout, atomicity and clear errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import mpu
from checkpointing import (
    CheckpointError,
    get_checkpoint_name,
    load_checkpoint_state,
    read_tracker,
    remove_orphaned_temporaries,
    save_checkpoint,
)
from tests.distributed import run_distributed


def test_layout_and_round_trip(tmp_path, single_process_group):
    mpu.model_parallel_cuda_manual_seed(3)
    weights = {"w": torch.randn(4, 3)}
    path = save_checkpoint(str(tmp_path), 100, weights, {"config": {"hidden_size": 3}}, {"step": 5})
    assert path == str(tmp_path / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    state = load_checkpoint_state(str(tmp_path))
    assert state["iteration"] == 100 and state["optimizer"] == {"step": 5}
    assert torch.equal(state["model"]["w"], weights["w"])
    assert set(state["rng"]) >= {"python", "numpy", "torch", "tracker"}
    assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name]


def test_missing_directory_means_start_from_scratch(tmp_path, single_process_group):
    assert load_checkpoint_state(str(tmp_path / "nothing-here")) is None


def test_corrupt_tracker_is_a_clear_error(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("banana\n")
    with pytest.raises(CheckpointError, match="expected an iteration number or 'release', found 'banana'"):
        read_tracker(str(tmp_path))


def _save_with_mp2(path):
    mpu.initialize_model_parallel(2)
    save_checkpoint(path, 7, {"w": torch.ones(2)}, {})


def test_loading_with_another_model_parallel_size_names_both(tmp_path, single_process_group):
    run_distributed(_save_with_mp2, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "iter_0000007")) == ["mp_rank_00", "mp_rank_01"]
    with pytest.raises(CheckpointError, match="model-parallel size 2, this run uses --model-parallel-size 1") as err:
        load_checkpoint_state(str(tmp_path))
    assert "tools/reshard_checkpoint.py" in str(err.value) and "--target-model-parallel-size 1" in str(err.value)


_SAVER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import mpu
    from checkpointing import save_checkpoint
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(1)
    save_checkpoint(sys.argv[1], 1, {"w": torch.ones(3)}, {})
    print("first saved", flush=True)
    save_checkpoint(sys.argv[1], 2, {"w": torch.randn(64, 1024, 1024)}, {})  # 256 MB: slow to write
    print("second saved", flush=True)
""")


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, single_process_group):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], cwd=root,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root})
    assert proc.stdout.readline().strip() == "first saved"
    partial = tmp_path / "iter_0000002" / "mp_rank_00"
    deadline = time.monotonic() + 60
    while not (partial.is_dir() and any(p.name.endswith(".partial") for p in partial.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None, "the second save never started"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_tracker(str(tmp_path)) == 1
    state = load_checkpoint_state(str(tmp_path))
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert not os.path.exists(get_checkpoint_name(str(tmp_path), 2))
    orphans = [str(p) for p in partial.iterdir()]
    assert len(orphans) == 1 and os.path.basename(orphans[0]).startswith(".model_optim_rng.pt.")
    assert remove_orphaned_temporaries(str(tmp_path)) == orphans  # its writer is dead: the next run cleans up
    assert list(partial.iterdir()) == [] and read_tracker(str(tmp_path)) == 1
