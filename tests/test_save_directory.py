"""A ``--save`` directory is never overwritten unasked (issue 28): checkpoints whose tracker is missing or
broken are refused, one run at a time holds ``--save`` (rank 0 keeps a lock with its host and pid), and
Ctrl-C stops a run as a stop request does (saved, exit status 130, one line).

The real entry point runs in a subprocess where the issue asks for it; variants of one case run in
this process (``run_gpt2_main``), which goes through the same ``run_main``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from atomic import LOCK_NAME, _host
from initialize import run_cli
from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import REPO, file_checksums, gpt2_args, run_gpt2_cli, run_gpt2_main
from tools import reshard_checkpoint

TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture
def trained(tiny_gpt2_run) -> tuple[str, str]:
    return tiny_gpt2_run


def _copy(ckpt: str, target) -> str:
    shutil.copytree(ckpt, target)
    return str(target)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(folder: str, pid: int, host: str | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": host or _host(), "pid": pid, "since": "2026-01-01 00:00:00"}, f)
    return path


def test_checkpoints_without_a_usable_tracker_are_never_overwritten(trained, tmp_path, capsys):
    folder, ckpt = trained
    untracked = _copy(ckpt, tmp_path / "untracked")
    os.remove(os.path.join(untracked, TRACKER))
    before = file_checksums(untracked)
    # The reported case: --load X --save X used to print "starting from scratch" and overwrite both.
    proc = run_gpt2_cli(gpt2_args(folder, **{"--load": untracked, "--save": untracked, "--train-iters": 4,
                                             "--save-interval": 2}))
    assert_one_line_error(proc.returncode, proc.stderr, f"--save {untracked} holds checkpoints",
                          "iter_0000002, iter_0000004", f"echo 4 > {os.path.join(untracked, TRACKER)}",
                          "--overwrite-checkpoints")
    # ... and the conversion tools say the same, without the training remedy.
    code = run_cli(lambda: reshard_checkpoint.main(["--load", untracked, "--save", str(tmp_path / "resharded"),
                                                    "--target-model-parallel-size", "1"]))
    err = capsys.readouterr().err
    assert_one_line_error(code, err, f"{untracked} holds checkpoints", "echo 4 >")
    assert "--overwrite-checkpoints" not in err and not os.path.exists(tmp_path / "resharded")
    # --save alone, and a tracker turned into a directory (which used to be overwritten, then the run said
    # "no earlier checkpoint was touched").
    code, _, err = run_gpt2_main(gpt2_args(folder, **{"--save": untracked, "--train-iters": 1}), capsys)
    assert_one_line_error(code, err, "holds checkpoints", "--overwrite-checkpoints")
    broken = _copy(ckpt, tmp_path / "broken")
    os.remove(os.path.join(broken, TRACKER))
    os.mkdir(os.path.join(broken, TRACKER))
    broken_before = file_checksums(broken)
    for extra in ({}, {"--overwrite-checkpoints": True}):
        code, out, err = run_gpt2_main(gpt2_args(folder, **{"--load": broken, "--save": broken, "--train-iters": 4,
                                                            "--save-interval": 2, **extra}), capsys)
        assert_one_line_error(code, err, f"{os.path.join(broken, TRACKER)} is not a file")
        assert "iteration        1/" not in out
    assert file_checksums(untracked) == before and file_checksums(broken) == broken_before
    assert sorted(os.listdir(untracked)) == ["iter_0000002", "iter_0000004"]
    # Starting over there is possible on purpose.
    code, _, err = run_gpt2_main(gpt2_args(folder, **{"--load": untracked, "--save": untracked, "--train-iters": 1,
                                                      "--eval-iters": 0, "--overwrite-checkpoints": True}), capsys)
    assert code == 0, err
    assert open(os.path.join(untracked, TRACKER)).read().strip() == "1"


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _assert_interrupted(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line or "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    return out, err


def test_one_run_per_save_directory_and_ctrl_c_saves_and_exits_130(trained, tmp_path):
    folder, _ = trained
    save = str(tmp_path / "shared")
    # With a data-loader worker, as by default: a terminal's Ctrl-C reaches the whole process group (the
    # workers inherit the stop request's handler, so they keep serving the iteration that finishes).
    argv = gpt2_args(folder, **{"--save": save, "--load": save, "--train-iters": 100000, "--save-interval": 3,
                                "--eval-iters": 0, "--num-workers": 1})
    first = subprocess.Popen([sys.executable, "pretrain_gpt2.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(os.path.join(save, TRACKER), first)  # holding the lock, and saved at least once
        second = run_gpt2_cli(argv + ["--exit-interval", "1"])  # the same run again: refused, nothing touched
        assert_one_line_error(second.returncode, second.stderr, f"--save {save} is in use by another run",
                              f"pid {first.pid} on host {_host()}")
        os.killpg(first.pid, signal.SIGINT)  # the first Ctrl-C: save, one line, 130
        _, err = _assert_interrupted(first)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "Ctrl-C: stopped at iteration" in err and "rerun the same command to continue" in err
    stopped_at = int(err.split("stopped at iteration ")[1].split(";")[0])
    assert open(os.path.join(save, TRACKER)).read().strip() == str(stopped_at)
    assert not os.path.exists(os.path.join(save, LOCK_NAME)), "the lock is released at the end"

    # Two Ctrl-C in a row: the second stops at once, still one line and 130; the tracker names a whole one.
    again = subprocess.Popen([sys.executable, "pretrain_gpt2.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(os.path.join(save, LOCK_NAME), again)
        time.sleep(1.0)
        again.send_signal(signal.SIGINT)
        again.send_signal(signal.SIGINT)
        _assert_interrupted(again)
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
    tracked = open(os.path.join(save, TRACKER)).read().strip()
    assert os.path.isfile(os.path.join(save, f"iter_{int(tracked):07d}", "mp_rank_00", "model_optim_rng.pt"))


def test_a_stale_lock_is_taken_over_with_a_warning(trained, tmp_path, capsys):
    folder, _ = trained
    save = str(tmp_path / "stale")
    _write_lock(save, _dead_pid())
    code, out, err = run_gpt2_main(gpt2_args(folder, **{"--save": save, "--train-iters": 1, "--eval-iters": 0}),
                                   capsys)
    assert code == 0, err
    assert "took over the lock" in out and "on this host is gone" in out
    assert not os.path.exists(os.path.join(save, LOCK_NAME))
    # Another host's lock: taken over only once its heartbeat is old.
    lock = _write_lock(save, 1, host="another-node")
    argv = gpt2_args(folder, **{"--load": save, "--save": save, "--train-iters": 2, "--eval-iters": 0})
    code, _, err = run_gpt2_main(argv, capsys)
    assert_one_line_error(code, err, "in use by another run (pid 1 on host another-node")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    code, out, err = run_gpt2_main(argv, capsys)
    assert code == 0 and "no heartbeat for" in out, err


def _run_cli_main(argv: list[str]) -> int:
    import pretrain_gpt2

    return run_cli(lambda: pretrain_gpt2.main(argv))


def test_rank_0_holds_the_lock_for_a_job_of_two_ranks(trained, tmp_path, capfd):
    folder, _ = trained
    save = str(tmp_path / "two_ranks")
    argv = gpt2_args(folder, **{"--save": save, "--train-iters": 2, "--eval-iters": 0})
    _write_lock(save, os.getpid())  # a live process of this host holds it
    assert run_distributed(_run_cli_main, 2, argv) == [1, 1]
    assert_one_line_error(1, capfd.readouterr().err, f"in use by another run (pid {os.getpid()}")
    _write_lock(save, _dead_pid())
    assert run_distributed(_run_cli_main, 2, argv) == [0, 0]  # rank 1 does not contend with rank 0
    out = capfd.readouterr().out
    assert out.count("took over the lock") == 1
    assert not os.path.exists(os.path.join(save, LOCK_NAME))
    assert open(os.path.join(save, TRACKER)).read().strip() == "2"


def test_the_holder_keeps_its_lock_fresh_with_a_heartbeat(tmp_path):
    from atomic import FolderLock

    lock = FolderLock(str(tmp_path), heartbeat_s=0.05)
    assert lock.acquire("--save X") is None
    try:
        old = time.time() - 3600
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 30
        while os.stat(lock.path).st_mtime < old + 60:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
    finally:
        lock.release()
    assert not os.path.exists(lock.path)
