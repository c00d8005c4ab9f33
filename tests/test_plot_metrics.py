"""tools/plot_metrics.py: reading metrics.jsonl (a resume's duplicates, nulls, eval lines, new keys), the plot of
two runs written atomically, and each bad input as one error line."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "plot_metrics.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
plot_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_metrics)


def train(iteration: int, loss: float | None, **extra) -> dict:
    return {"iteration": iteration, "split": "train", "lm_loss": loss, "lr": 1e-4 * iteration / 40,
            "loss_scale": 1.0, "grad_norm": 1.5, "skipped_iters": 0, "tokens_per_s": 1000.0 + iteration,
            "elapsed_s": iteration / 10, **extra}


def valid(iteration: int, loss: float | None, split: str = "valid") -> dict:
    return {"iteration": iteration, "split": split, "lm_loss": loss, "ppl": None if loss is None else math.exp(loss)}


def write_jsonl(path, records: list[dict | str]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def resumed_run(path) -> str:
    """Iterations 10-30, killed after 30 but resumed from the checkpoint at 20: 30 is logged again, then 40."""
    return write_jsonl(path, [
        valid(0, 7.0),
        train(10, 6.0),
        train(20, None),  # diverged here before the resume
        valid(20, 5.5),
        train(30, 5.0, mfu=0.3),
        "",
        train(20, 5.2),  # the resumed run from the checkpoint at 20
        valid(20, 5.4),
        train(30, 4.8),  # no mfu this time: the later line wins, all of it
        train(40, 4.5, mfu=0.31, time_forward_ms=12, note="text is not a metric", flag=True),
        valid(40, None),
        valid(40, 4.6, split="test"),
    ])


def run_tool(*args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
    """The tool as a user runs it; ``prelude`` is Python run first in the same process."""
    code = f"import runpy, sys; {prelude}; sys.argv = {['plot_metrics.py', *args]!r}; runpy.run_path({TOOL!r}, " \
           "run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)


def assert_one_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_read_metrics_later_line_wins_nulls_stay_none_eval_and_new_keys_kept(tmp_path):
    metrics = plot_metrics.read_metrics(resumed_run(tmp_path / "run" / "metrics.jsonl"))

    assert sorted(metrics) == ["test", "train", "valid"]
    assert metrics["train"]["lm_loss"] == [(10, 6.0), (20, 5.2), (30, 4.8), (40, 4.5)]
    assert metrics["train"]["mfu"] == [(40, 0.31)]  # iteration 30's mfu went with its replaced line
    assert metrics["train"]["time_forward_ms"] == [(40, 12.0)]
    assert "note" not in metrics["train"] and "flag" not in metrics["train"]
    assert "iteration" not in metrics["train"] and "split" not in metrics["train"]
    assert [i for i, _ in metrics["train"]["tokens_per_s"]] == [10, 20, 30, 40]
    assert metrics["valid"]["lm_loss"] == [(0, 7.0), (20, 5.4), (40, None)]
    assert metrics["valid"]["ppl"][-1] == (40, None)
    assert metrics["test"]["lm_loss"] == [(40, 4.6)]


def test_read_metrics_null_is_none_not_zero(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", [train(10, 3.0), train(20, None), train(30, 2.0)])
    assert plot_metrics.read_metrics(path)["train"]["lm_loss"] == [(10, 3.0), (20, None), (30, 2.0)]


def test_labels_are_folder_names_made_unique(tmp_path):
    paths = [str(tmp_path / "a" / "logs" / "metrics.jsonl"), str(tmp_path / "b" / "logs" / "metrics.jsonl"),
             str(tmp_path / "c" / "gpt2" / "metrics.jsonl"), str(tmp_path / "a" / "logs" / "metrics.jsonl")]
    assert plot_metrics.run_labels(paths[2:3]) == ["gpt2"]
    assert plot_metrics.run_labels(paths) == ["a/logs", "b/logs", "gpt2", "a/logs (2)"]


def test_plot_of_two_runs_is_one_png_and_a_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    first = resumed_run(tmp_path / "runs" / "a" / "logs" / "metrics.jsonl")
    write_jsonl(tmp_path / "runs" / "b" / "logs" / "metrics.jsonl",
                [train(10, 6.5), train(20, 6.0), valid(20, 6.1), train(30, None)])
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    out = str(out_dir / "curve.png")

    plot_metrics.main([first, str(tmp_path / "runs" / "b" / "logs"), "-o", out, "--keys", "lm_loss,lr,mfu,absent"])

    assert os.listdir(out_dir) == ["curve.png"]
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("note: no run has absent")
    assert lines[1] == f"wrote {out}: 3 panel(s) (lm_loss, lr, mfu) for 2 run(s)"
    assert lines[2].split(" | ")[:3] == ["  a/logs: last iteration 40", "train lm_loss 4.5000",
                                         "valid lm_loss null (not finite)"]
    assert lines[3].split(" | ")[:3] == ["  b/logs: last iteration 30", "train lm_loss null (not finite)",
                                         "valid lm_loss 6.1000 (iteration 20)"]


def test_null_is_a_gap_in_the_curve_and_eval_values_are_markers(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = plot_metrics.read_metrics(resumed_run(tmp_path / "metrics.jsonl"))
    metrics["train"]["lm_loss"].insert(2, (25, None))
    fig = plot_metrics.plot_runs([("a", metrics), ("b", metrics)], ["lm_loss", "lr"], log_y=True)

    loss_panel, lr_panel = fig.axes
    lines = {line.get_label(): line for line in loss_panel.get_lines()}
    assert sorted(lines) == ["a test", "a train", "a valid", "b test", "b train", "b valid"]
    ys = list(lines["a train"].get_ydata())
    assert list(lines["a train"].get_xdata()) == [10, 20, 25, 30, 40]
    assert math.isnan(ys[2]) and 0 not in ys and ys[3] == 4.8
    assert lines["a valid"].get_linestyle() == "None" and lines["a valid"].get_marker() == "o"
    assert math.isnan(lines["a valid"].get_ydata()[-1])
    assert loss_panel.get_yscale() == "log" and lr_panel.get_xlabel() == "iteration"


def test_a_training_series_of_one_point_is_drawn_as_a_marker(tmp_path):
    pytest.importorskip("matplotlib")
    one = plot_metrics.read_metrics(write_jsonl(tmp_path / "one" / "metrics.jsonl", [train(10, 5.0)]))
    many = plot_metrics.read_metrics(resumed_run(tmp_path / "many" / "metrics.jsonl"))
    fig = plot_metrics.plot_runs([("one", one), ("many", many)], ["lm_loss"])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["one train"].get_marker() == "o" and list(lines["one train"].get_ydata()) == [5.0]
    assert lines["many train"].get_marker() == "None"


def test_failed_write_leaves_the_old_image_and_no_partial_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    run = resumed_run(tmp_path / "run" / "metrics.jsonl")
    out = tmp_path / "plots" / "curve.png"
    out.parent.mkdir()
    out.write_bytes(b"the previous plot")

    def disk_full(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)  # half an image, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(SystemExit) as exc:
        plot_metrics.main([run, "-o", str(out), "--overwrite"])
    assert str(exc.value.code).startswith(f"error: cannot write {out}: no space left on the device (ENOSPC)")
    assert os.listdir(out.parent) == ["curve.png"] and out.read_bytes() == b"the previous plot"


@pytest.mark.parametrize("case", ["missing file", "folder without metrics", "malformed line", "bad iteration",
                                  "no train lines", "empty file", "missing output folder", "labels count",
                                  "no key present"])
def test_bad_input_is_one_error_line(tmp_path, case):
    good = resumed_run(tmp_path / "good" / "metrics.jsonl")
    out = str(tmp_path / "curve.png")
    args, fragments = {
        "missing file": ([str(tmp_path / "nope.jsonl")], ["nope.jsonl: no such file or directory"]),
        "folder without metrics": ([str(tmp_path)], [f"{tmp_path}: no metrics.jsonl in this directory"]),
        "malformed line": ([write_jsonl(tmp_path / "bad.jsonl", [train(10, 3.0), "", '{"iteration": 20, "spl'])],
                           [f"{tmp_path / 'bad.jsonl'}:3: malformed JSON"]),
        "bad iteration": ([write_jsonl(tmp_path / "odd.jsonl", [train(10, 3.0), {"iteration": "20", "split": "x"}])],
                          [f"{tmp_path / 'odd.jsonl'}:2: \"iteration\" must be an integer"]),
        "no train lines": ([write_jsonl(tmp_path / "eval.jsonl", [valid(0, 7.0), valid(10, 6.0)])],
                           ["eval.jsonl has no training lines"]),
        "empty file": ([write_jsonl(tmp_path / "empty.jsonl", [])], ["empty.jsonl has no training lines"]),
        "missing output folder": ([good, "-o", str(tmp_path / "nowhere" / "curve.png")],
                                  [f"the folder {tmp_path / 'nowhere'} does not exist"]),
        "labels count": ([good, good, "--labels", "one"], ["--labels gives 1 name(s) for 2 run(s)"]),
        "no key present": ([good, "--keys", "mfu_total,bleu"], ["no run has mfu_total, bleu"]),
    }[case]
    result = run_tool(*args, *([] if "-o" in args else ["-o", out]))
    assert_one_error(result, *fragments)
    assert not [name for name in os.listdir(tmp_path) if "curve" in name]  # no image, no temporary


def test_without_matplotlib_one_line_says_how_to_install_it(tmp_path):
    good = resumed_run(tmp_path / "good" / "metrics.jsonl")
    result = run_tool(good, "-o", str(tmp_path / "curve.png"), prelude="sys.modules['matplotlib'] = None")
    assert_one_error(result)
    assert result.stderr.strip() == "error: plotting needs matplotlib (pip install matplotlib)"
    assert not os.path.exists(tmp_path / "curve.png")
