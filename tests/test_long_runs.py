"""Runs that can be left alone for days (issue 13): preemption, dead ranks, divergence, bounded disk,
set-up checks that every rank agrees on.

Each behaviour is checked the way a cluster produces it: a real signal to one rank of a torchrun job,
a rank killed with SIGKILL, a NaN injected on one rank at one iteration, a save that fails on one
rank, a kill -9 in the middle of saving with retention on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.distributed import free_port, run_distributed
from tests.helpers import gpt2_args, run_gpt2_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(log_dir) -> dict[int, float]:
    """Training lm_loss by iteration from metrics.jsonl; a resumed run's later lines win."""
    losses = {}
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "train":
                losses[record["iteration"]] = record["lm_loss"]
    return losses


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _torchrun(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), os.path.join(REPO, "pretrain_gpt2.py"), *argv]


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_on_both_and_the_rerun_resumes_exactly(tmp_path):
    ckpt, logs, ref_logs = tmp_path / "ckpt", tmp_path / "logs", tmp_path / "ref_logs"
    common = {"--train-iters": 150, "--eval-iters": 0, "--save-interval": 1000, "--resume-dataloader": True,
              "--num-workers": 0}
    argv = gpt2_args(tmp_path, **common, **{"--save": str(ckpt), "--load": str(ckpt), "--log-dir": str(logs)})
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_torchrun(argv), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if " iteration        5/" in line:
            workers = _children(proc.pid)
            assert len(workers) == 2, workers
            os.kill(max(workers), signal.SIGTERM)  # one rank only, as a node's own preemption would
            break
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 0, "".join(output)
    text = "".join(output)
    stopped = int(open(ckpt / "latest_checkpointed_iteration.txt").read())
    assert 5 <= stopped < 150, text
    assert f"exiting at iteration {stopped}: received SIGTERM; rerun the same command to continue" in text
    assert "stopped early (received SIGTERM)" in text
    rerun = subprocess.run(_torchrun(argv), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"loaded checkpoint from {ckpt} at iteration {stopped}" in rerun.stdout
    reference = gpt2_args(tmp_path, **common, **{"--save": str(tmp_path / "ref"), "--log-dir": str(ref_logs)})
    whole = subprocess.run(_torchrun(reference), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    resumed, unbroken = _losses(logs), _losses(ref_logs)
    assert sorted(resumed) == sorted(unbroken) == list(range(1, 151))
    assert resumed == unbroken  # bitwise on CPU: the interruption changed nothing


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_dead_or_frozen_rank_makes_the_other_exit_nonzero_within_the_timeout(tmp_path, fault):
    timeout_minutes = 0.1
    argv = gpt2_args(tmp_path, **{"--train-iters": 100000, "--eval-iters": 0, "--log-interval": 10,
                                  "--distributed-timeout-minutes": timeout_minutes})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_gpt2.py"), *argv], cwd=REPO,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        for line in procs[0].stdout:
            if " iteration       20/" in line:
                break
        os.kill(procs[1].pid, fault)  # frozen: alive and connected, but never answers again
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode != 0
        assert time.monotonic() - killed_at < timeout_minutes * 60 + 10
        assert "Traceback" not in err, err
        assert "error: rank 0 lost contact with another rank of the job" in err, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.poll() is not None for proc in procs)


def _train_with_nan(argv: list[str], nan_rank: int, nan_calls: set[int], gradients_too: bool = True) -> dict:
    """Train GPT2 with the loss made NaN on ``nan_rank`` at the given forward calls (1-based): its gradients
    too (``loss * nan``), or the loss alone with finite gradients (``loss + nan``)."""
    import torch.distributed as dist

    import pretrain_gpt2
    from arguments import get_args
    from training import pretrain

    args = get_args(argv)
    calls = [0]

    def provider(args, tokenizer, device):
        step = pretrain_gpt2.forward_step_provider(args, tokenizer, device)

        def forward_step(batch, model):
            loss, metrics = step(batch, model)
            if model.training:
                calls[0] += 1
                if dist.get_rank() == nan_rank and calls[0] in nan_calls:
                    loss = loss * float("nan") if gradients_too else loss + float("nan")
            return loss, metrics

        return forward_step

    try:
        results = pretrain(args, pretrain_gpt2.model_provider, pretrain_gpt2.data_provider, provider)
    except Exception as err:  # noqa: BLE001 - the test wants the message on every rank
        return {"error": f"{type(err).__name__}: {err}", "agreed": getattr(err, "every_rank", False)}
    return results


def test_a_nan_on_one_rank_is_skipped_on_all_ranks_and_counted(tmp_path):
    logs = tmp_path / "logs"
    argv = gpt2_args(tmp_path, **{"--train-iters": 8, "--eval-iters": 0, "--log-dir": str(logs),
                                  "--save": str(tmp_path / "ckpt")})
    results = run_distributed(_train_with_nan, 2, argv, 1, {4})
    assert all("error" not in r for r in results), results
    records = [json.loads(line) for line in open(logs / "metrics.jsonl")]
    assert all(r["split"] == "train" for r in records)  # --eval-iters 0: no empty validation lines
    assert [r["skipped_iters"] for r in records] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(r["lm_loss"] == r["lm_loss"] for i, r in enumerate(records) if i != 3)  # finite after the NaN
    state = torch.load(tmp_path / "ckpt" / "iter_0000008" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert state["skipped_iters"] == 1 and state["lr_scheduler"]["num_iters"] == 7  # no schedule step on a skip
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_abort_on_nonfinite_stops_every_rank_naming_the_iteration_and_saves_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = gpt2_args(tmp_path, **{"--train-iters": 8, "--eval-iters": 0, "--save": str(ckpt),
                                  "--save-interval": 2, "--abort-on-nonfinite": True})
    results = run_distributed(_train_with_nan, 2, argv, 0, {5}, False)  # a NaN loss, finite gradients
    for result in results:
        assert result["error"].startswith("NonFiniteError: iteration 5: the loss or gradient norm is not finite")
        assert result["agreed"]
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]


def test_too_many_skipped_steps_stop_the_run(tmp_path):
    argv = gpt2_args(tmp_path, **{"--train-iters": 30, "--eval-iters": 0, "--skipped-window": 4,
                                  "--max-skipped-fraction": 0.5})
    results = run_distributed(_train_with_nan, 2, argv, 1, set(range(6, 31)))
    for result in results:
        assert result["error"].startswith("NonFiniteError: iteration 8: 3 of the last 4 steps were skipped"), result


def test_exit_duration_saves_and_exits_zero(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = gpt2_args(tmp_path, **{"--train-iters": 1000, "--eval-iters": 0, "--save": str(ckpt),
                                  "--exit-duration-in-mins": 1e-6})
    code, out, err = run_gpt2_main(argv, capsys)
    assert code == 0, err
    assert open(ckpt / "latest_checkpointed_iteration.txt").read().strip() == "1"
    assert "exiting at iteration 1: --exit-duration-in-mins 1e-06 reached" in out


def test_keep_last_checkpoints_leaves_exactly_the_newest(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = gpt2_args(tmp_path, **{"--train-iters": 6, "--eval-iters": 0, "--save": str(ckpt), "--save-interval": 1,
                                  "--keep-last-checkpoints": 2})
    code, out, err = run_gpt2_main(argv, capsys)
    assert code == 0, err
    assert sorted(os.listdir(ckpt)) == ["iter_0000005", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert "removed 1 older checkpoint(s) (--keep-last-checkpoints 2): iter_0000004" in out


_RETAINING_SAVER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import mpu
    from checkpointing import remove_old_checkpoints, save_checkpoint
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(1)
    for it in range(1, 10000):
        save_checkpoint(sys.argv[1], it, {"w": torch.full((256, 1024), float(it))}, {})
        remove_old_checkpoints(sys.argv[1], 1)
        print(it, flush=True)
""")


def test_kill_during_save_with_retention_never_loses_the_tracked_checkpoint(tmp_path, single_process_group):
    from checkpointing import load_checkpoint_state, read_tracker, remove_orphaned_temporaries

    rng = random.Random(3)
    env = {**os.environ, "PYTHONPATH": REPO}
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _RETAINING_SAVER, str(tmp_path)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save done
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        iteration = read_tracker(str(tmp_path))
        state = load_checkpoint_state(str(tmp_path))
        assert state["iteration"] == iteration, trial
        assert torch.equal(state["model"]["w"], torch.full((256, 1024), float(iteration)))
        remove_orphaned_temporaries(str(tmp_path))


def _save_failing_on_rank_1(path: str) -> str:
    import errno

    import torch.distributed as dist

    import checkpointing
    import mpu

    mpu.initialize_model_parallel(2)
    mpu.model_parallel_cuda_manual_seed(1)
    checkpointing.save_checkpoint(path, 1, {"w": torch.ones(2)}, {})
    real = checkpointing._atomic_torch_save

    def full_disk(obj, target):
        if dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, target)

    checkpointing._atomic_torch_save = full_disk
    try:
        checkpointing.save_checkpoint(path, 2, {"w": torch.zeros(2)}, {})
    except checkpointing.CheckpointError as err:
        return str(err)
    return "saved"


def test_a_full_disk_on_one_rank_fails_the_save_everywhere_and_keeps_the_previous(tmp_path):
    from checkpointing import read_tracker

    messages = run_distributed(_save_failing_on_rank_1, 2, str(tmp_path))
    for message in messages:
        assert "saving iteration 2 failed on rank 1 (No space left on device)" in message, message
        assert "the previous checkpoint (iteration 1) is intact" in message
    assert read_tracker(str(tmp_path)) == 1


def _setup_fails_on_rank_1(argv: list[str]) -> dict:
    import torch.distributed as dist

    import pretrain_gpt2
    from arguments import get_args

    if dist.get_rank() == 1:  # this node cannot see the checkpoint directory as a directory
        argv = list(argv)
        argv[argv.index("--save") + 1] = argv[argv.index("--train-data") + 1]
    try:
        pretrain_gpt2.run(get_args(argv))
    except Exception as err:  # noqa: BLE001
        return {"error": str(err), "agreed": getattr(err, "every_rank", False)}
    return {}


def test_a_setup_mistake_on_one_rank_stops_every_rank_together(tmp_path):
    argv = gpt2_args(tmp_path, **{"--train-iters": 2, "--eval-iters": 0, "--save": str(tmp_path / "ckpt")})
    results = run_distributed(_setup_fails_on_rank_1, 2, argv, timeout=60)
    for result in results:
        assert result.get("agreed") and result["error"].startswith("rank 1: --save "), result
        assert "is a file, not a directory" in result["error"]
