"""bench/serve_load.py end to end with tiny settings: it runs, prints every field and exits 0 (timings unchecked)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO


def test_serve_load_bench_runs_and_reports(tmp_path):
    argv = [sys.executable, "bench/serve_load.py", "--cache-dir", str(tmp_path), "--num-layers", "1",
            "--hidden-size", "32", "--heads", "2", "--max-positions", "64", "--concurrency", "1", "2",
            "--requests", "3", "--max-tokens", "4", "--batch", "2", "--time-limit", "240"]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "tests' tiny GPT-2 table" in out  # the empty --cache-dir has no real vocabulary
    for mode in ("one-at-a-time", "batched"):
        for clients in (1, 2):
            line = re.search(rf"{mode} \| clients +{clients} \| done +(\d+) lost +(\d+) \| +[\d.]+ tokens/s \| "
                             r"latency p50 +[\d.]+s p99 +[\d.]+s \| ttft p50 +[\d.]+s p99 +[\d.]+s", out)
            assert line, f"no {mode} line for {clients} clients in:\n{out}"
            assert line.groups() == ("3", "0")
    for clients in (1, 2):
        assert re.search(rf"clients +{clients}: \d+\.\d\d +\(greedy texts agree on \d/3 requests\)", out), out
    bad = re.findall(r"-> HTTP (\S+): (ok|WRONG)", out)
    assert bad == [("400", "ok")] * 4, out
    assert "requests lost: 0; bad requests not answered 400: 0; server kept serving: yes" in out
