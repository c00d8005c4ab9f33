"""Plot the training curves of one or more runs from their ``metrics.jsonl``.

    python tools/plot_metrics.py RUN [RUN ...] -o curve.png [--keys lm_loss,lr,tokens_per_s] [--labels a,b] [--log-y]
        [--overwrite]

Each RUN is a ``metrics.jsonl`` or the ``--log-dir`` holding one. One panel per key, iteration on the x
axis, every run overlaid in its own colour with a legend (a run is labelled by the folder holding its
``metrics.jsonl``, with as many parent folders as it takes to tell the runs apart, or by ``--labels``).
A key's training values are drawn as a line and its validation (test) values as round (cross) markers
in the same panel, so the default first panel shows the training and the validation loss together,
followed by the learning rate and the throughput. A value written as ``null`` (not finite: a diverged
loss) is a gap in the curve, never a zero; a training value without a neighbour (a run with one log line) is a
marker, since a line needs two points. A resumed run appends to the same file: when an iteration
of a split appears twice, the later line wins. Keys that no run has are skipped with a note.

The image (its format from the extension of ``-o``: png, pdf, svg, ...) is written under a temporary
name beside ``-o`` and renamed into place, so it is never left half-written; an existing ``-o`` is
replaced only with ``--overwrite``. Needs matplotlib
(``pip install matplotlib``); ``read_metrics`` does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import atomic_path, check_new_file  # noqa: E402
from errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_NAME = "metrics.jsonl"
DEFAULT_KEYS = ("lm_loss", "lr", "tokens_per_s")
LOSS_KEY = "lm_loss"  # the loss the summary reports
EVAL_MARKERS = {"valid": "o", "test": "x"}  # any other split: squares

Series = list[tuple[int, float | None]]
Metrics = dict[str, dict[str, Series]]


class MetricsError(ValueError):
    """A metrics file that cannot be read; the message names the file (and line)."""


def _number(value: object) -> tuple[bool, float | None]:
    """Whether ``value`` is a metric value, and that value as a float (``None`` for null or not finite)."""
    if value is None:
        return True, None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False, None
    value = float(value)
    return True, value if math.isfinite(value) else None


def read_metrics(path: str) -> Metrics:
    """``split -> key -> [(iteration, value), ...]`` from a ``metrics.jsonl``, sorted by iteration.

    When a split's iteration appears on several lines (a resumed run appends to the file), the later
    line wins, all of its keys. ``null`` (and a non-finite number) reads as ``None``; keys other than
    ``iteration`` and ``split`` are kept whatever their name, as long as their values are numbers. Blank
    lines are skipped; anything else that is not a JSON object with an integer ``iteration`` and a
    ``split`` raises ``MetricsError`` naming ``path:line``. A split whose lines carry no numbers maps to ``{}``.
    """
    lines: dict[str, dict[int, dict]] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MetricsError(f"{where}: not UTF-8 text; is this a metrics.jsonl?") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MetricsError(f"{where}: malformed JSON ({exc.msg}, column {exc.colno}): "
                                   f"{text.strip()[:60]!r}") from None
            if not isinstance(record, dict):
                raise MetricsError(f"{where}: expected a JSON object, found {text.strip()[:60]!r}")
            iteration, split = record.get("iteration"), record.get("split")
            if isinstance(iteration, bool) or not isinstance(iteration, int):
                raise MetricsError(f"{where}: \"iteration\" must be an integer, found {iteration!r}")
            if not isinstance(split, str) or not split:
                raise MetricsError(f"{where}: \"split\" must be a name (train, valid, test), found {split!r}")
            lines.setdefault(split, {})[iteration] = record  # a resumed run's later line replaces the earlier one
    metrics: Metrics = {}
    for split, by_iteration in lines.items():
        keys: dict[str, Series] = {}
        for iteration in sorted(by_iteration):
            for key, value in by_iteration[iteration].items():
                is_number, value = _number(value)
                if key not in ("iteration", "split") and is_number:
                    keys.setdefault(key, []).append((iteration, value))
        metrics[split] = keys
    return metrics


def metrics_path(run: str) -> str:
    """The ``metrics.jsonl`` a RUN argument names: the file itself, or the one in a log directory."""
    if os.path.isdir(run):
        path = os.path.join(run, METRICS_NAME)
        if not os.path.isfile(path):
            raise MetricsError(f"{run}: no {METRICS_NAME} in this directory; pass a run's --log-dir or the file")
        return path
    if not os.path.exists(run):
        raise MetricsError(f"{run}: no such file or directory")
    return run


def run_labels(paths: Sequence[str]) -> list[str]:
    """Each run's folder name, with parent folders added to the runs that share it, numbered if still equal."""
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    distinct = list(dict.fromkeys(folders))
    parts = [[p for p in folder.split(os.sep) if p] or [os.sep] for folder in distinct]
    depth = [1] * len(distinct)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    name_of = dict(zip(distinct, names))
    labels = []
    for i, folder in enumerate(folders):  # the same folder given twice: "logs", "logs (2)"
        n = folders[:i].count(folder)
        labels.append(f"{name_of[folder]} ({n + 1})" if n else name_of[folder])
    return labels


def _split_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise SystemExit(f"error: {flag} {text!r} has an empty entry; give names separated by commas")
    return items


def _splits(metrics: Metrics) -> list[str]:
    """Training first, then validation, test and any other split by name."""
    order = {"train": 0, "valid": 1, "test": 2}
    return sorted(metrics, key=lambda s: (order.get(s, 3), s))


def _isolated(ys: Sequence[float]) -> bool:
    """Whether a finite value has no finite neighbour (one point, or one between gaps)."""
    finite = [not math.isnan(y) for y in ys]
    return any(ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(ys) and finite[i + 1])
               for i, ok in enumerate(finite))


def plot_runs(runs: Sequence[tuple[str, Metrics]], keys: Sequence[str], log_y: bool = False) -> Figure:
    """One panel per key, each run in its own colour: training as a line, other splits as markers."""
    import matplotlib
    from matplotlib.figure import Figure

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    fig = Figure(figsize=(9, 1.0 + 2.6 * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        for i, (label, metrics) in enumerate(runs):
            color = colors[i % len(colors)]
            for split in _splits(metrics):
                series = metrics[split].get(key)
                if not series:
                    continue
                xs = [iteration for iteration, _ in series]
                # None -> NaN: matplotlib leaves a gap there (a diverged value is not a zero).
                ys = [math.nan if v is None or (log_y and v <= 0) else v for _, v in series]
                name = label if len(runs) > 1 else ""
                if split == "train":  # a point without a neighbour draws no line: it gets a marker
                    ax.plot(xs, ys, color=color, linewidth=1.2, marker="o" if _isolated(ys) else "None",
                            markersize=3, label=f"{name} train".strip())
                else:
                    ax.plot(xs, ys, color=color, linestyle="none", marker=EVAL_MARKERS.get(split, "s"),
                            markersize=4, label=f"{name} {split}".strip())
        positive = any(y > 0 for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(y))
        if log_y and positive:
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("iteration")
    return fig


def _format(value: float | None) -> str:
    return "null (not finite)" if value is None else f"{value:.4f}"


def summary(label: str, path: str, metrics: Metrics) -> str:
    """``label: last iteration N | train lm_loss X | valid lm_loss Y (iteration M) | path``."""
    last = max((i for keys in metrics.values() for series in keys.values() for i, _ in series), default=None)
    parts = [f"{label}: last iteration {last}"]
    for split in ("train", "valid"):
        series = metrics.get(split, {}).get(LOSS_KEY)
        if series:
            iteration, value = series[-1]
            at = f" (iteration {iteration})" if iteration != last else ""
            parts.append(f"{split} {LOSS_KEY} {_format(value)}{at}")
        else:
            parts.append(f"no {split} {LOSS_KEY}")
    return " | ".join(parts + [path])


def write_figure(fig: Figure, out: str, fmt: str) -> None:
    """Save under a temporary name beside ``out`` and rename it into place: never a half-written image."""
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    except UserError as exc:  # a failed write: one line naming the image
        raise SystemExit(f"error: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a metrics.jsonl, or a --log-dir holding one")
    parser.add_argument("-o", "--output", required=True, help="the image to write (png, pdf, svg, ...)")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS),
                        help="comma-separated metrics, one panel each (default: %(default)s; training and "
                             "validation values share a panel)")
    parser.add_argument("--labels", default=None, help="comma-separated legend names, one per RUN "
                        "(default: each run's folder name)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing -o image")
    args = parser.parse_args(argv)

    keys = list(dict.fromkeys(_split_list(args.keys, "--keys")))
    out = args.output
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: -o {out}: the folder {folder} does not exist; create it first")
    if os.path.isdir(out):
        raise SystemExit(f"error: -o {out} is a directory; name the image file: -o {os.path.join(out, 'curve.png')}")
    fmt = os.path.splitext(out)[1][1:].lower() or "png"
    try:
        check_new_file(out, "-o", args.overwrite)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None

    runs: list[tuple[str, Metrics]] = []
    paths = []
    for run in args.runs:
        try:
            path = metrics_path(run)
            metrics = read_metrics(path)
        except MetricsError as exc:
            raise SystemExit(f"error: {exc}") from None
        except OSError as exc:
            raise SystemExit(f"error: {run}: cannot read it ({exc.strerror or exc})") from None
        if "train" not in metrics:
            raise SystemExit(f"error: {path} has no training lines (\"split\": \"train\"): the run has logged none "
                             f"yet, or this is not a training run's {METRICS_NAME}")
        paths.append(path)
        runs.append(("", metrics))
    if args.labels is None:
        labels = run_labels(paths)
    else:
        labels = _split_list(args.labels, "--labels")
        if len(labels) != len(paths):
            raise SystemExit(f"error: --labels gives {len(labels)} name(s) for {len(paths)} run(s); give one per RUN")
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise SystemExit(f"error: --labels names {', '.join(twice)} more than once; each run needs its own")
    runs = [(label, metrics) for label, (_, metrics) in zip(labels, runs)]

    present = {key for _, metrics in runs for split in metrics.values() for key in split}
    missing = [key for key in keys if key not in present]
    keys = [key for key in keys if key in present]
    if not keys:
        raise SystemExit(f"error: no run has {', '.join(missing)}; the runs have {', '.join(sorted(present))}")
    for key in missing:
        print(f"note: no run has {key}; its panel is left out (the runs have {', '.join(sorted(present))})")

    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib)") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise SystemExit(f"error: -o {out}: matplotlib cannot write .{fmt} images; use one of "
                         f"{', '.join(sorted(formats))}")

    write_figure(plot_runs(runs, keys, args.log_y), out, fmt)
    print(f"wrote {out}: {len(keys)} panel(s) ({', '.join(keys)}) for {len(runs)} run(s)")
    for (label, metrics), path in zip(runs, paths):
        print("  " + summary(label, path, metrics))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C; no output was left half written", file=sys.stderr)
        sys.exit(130)
