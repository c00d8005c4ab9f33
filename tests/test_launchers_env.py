"""Launch environments other than torchrun: OpenMPI's and SLURM's variables become RANK/WORLD_SIZE/LOCAL_RANK."""

import os
import subprocess
import sys

import pytest

from arguments import ArgumentError, adopt_launcher_environment
from tests.helpers import gpt2_args, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASTER = {"MASTER_ADDR": "node0", "MASTER_PORT": "6000"}


@pytest.mark.parametrize("variables, expected", [
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, ("5", "8", "1")),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}, ("3", "4", "3")),
])
def test_mpi_and_slurm_variables_become_torchrun_ones(variables, expected):
    env = {**variables, **MASTER}
    assert adopt_launcher_environment(env) is not None
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == expected


def test_torchrun_variables_win_and_a_plain_run_is_left_alone():
    env = {"WORLD_SIZE": "2", "RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert adopt_launcher_environment(env) is None and env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    env = {"PATH": "/bin"}
    assert adopt_launcher_environment(env) is None and "RANK" not in env


def test_a_multi_process_launch_without_a_master_address_is_one_clear_error():
    with pytest.raises(ArgumentError, match="MASTER_ADDR and MASTER_PORT are not set"):
        adopt_launcher_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    single = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # one task needs no rendezvous address
    assert adopt_launcher_environment(single) and single["WORLD_SIZE"] == "1"


def test_the_entry_point_reports_it_on_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    proc = subprocess.run([sys.executable, "pretrain_gpt2.py", "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "OpenMPI" in proc.stderr and "MASTER_ADDR" in proc.stderr


@pytest.mark.slow
def test_two_processes_launched_the_slurm_way_train_together(tmp_path):
    from tests.distributed import free_port

    log_dir = str(tmp_path / "logs")
    argv = gpt2_args(tmp_path, **{"--train-iters": 3, "--eval-iters": 0, "--batch-size": 2, "--log-dir": log_dir})
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "pretrain_gpt2.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # Two unconnected single-process runs would both be rank 0 and write every iteration twice.
    assert [r["iteration"] for r in read_metrics(log_dir)] == [1, 2, 3]
