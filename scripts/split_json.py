"""Split loose-json files into train/dev/test files at random, with a map of where each line came from.

    python scripts/split_json.py --input_files A.json [B.json ...] --output_dir DIR \\
        [--test_percent 0.05 [0.01]] [--seed 1234] [--overwrite]

(the 2019 flag names; ``--input-files``, ``--output-dir`` and ``--test-percent`` work too). The non-blank
lines of all inputs are pooled and shuffled by ``--seed``; the first ``ceil(f_dev * N)`` of the shuffled
order go to ``dev.json``, the next ``ceil(f_test * N)`` to ``test.json`` (fractions of the ``N`` lines;
the test fraction defaults to 0) and the rest to ``train.json``, each in that shuffled order. Every
non-blank input line lands in exactly one output, byte for byte (a last line without a newline gets
one); blank lines are dropped. Each line must be a json object, else the run stops at the first bad
line with ``FILE:LINE``.

Beside each output, ``NAME.json.map`` (Megatron-LM 2019's format) says where each of its lines came
from: a header ``file<TAB>line #``, then per output line ``F<TAB>L``: ``F`` the 0-based position of the
input in ``--input_files`` and ``L`` the 0-based line number in that file (blank lines counted).

All six files are written under temporary names and renamed into place together at the end; existing
outputs are refused unless ``--overwrite`` (``--force``). The same inputs, fractions and seed give the same
files.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import sys
from array import array

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import remove_orphans, temporary_path  # noqa: E402
from data_utils.errors import DataError  # noqa: E402
from initialize import run_cli  # noqa: E402

SPLITS = ("train", "dev", "test")
MAP_HEADER = "file\tline #"


class LineIndex:
    """Where each non-blank line of the inputs is: input number, 0-based line number, byte span."""

    def __init__(self) -> None:
        self.file, self.line = array("i"), array("q")
        self.start, self.end = array("q"), array("q")  # end excludes the line's "\n"

    def __len__(self) -> int:
        return len(self.file)


def check_json_object(raw: bytes, path: str, lineno: int) -> None:
    """``DataError`` naming ``path:lineno`` unless ``raw`` is one json object."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}); loose json needs one "
                        "complete json object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a json object, got {type(record).__name__}")


def index_lines(paths: list[str], on_bytes=None) -> LineIndex:
    """Every non-blank line of ``paths``, each checked to be a json object."""
    index = LineIndex()
    for f_idx, path in enumerate(paths):
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise DataError(f"--input_files {path}: cannot open ({exc.strerror})") from None
        with f:
            pos = 0
            for l_idx, raw in enumerate(f):
                if raw.strip():
                    check_json_object(raw, path, l_idx + 1)
                    index.file.append(f_idx)
                    index.line.append(l_idx)
                    index.start.append(pos)
                    index.end.append(pos + len(raw) - raw.endswith(b"\n"))
                pos += len(raw)
                if on_bytes is not None:
                    on_bytes(len(raw))
    return index


def check_fractions(fractions: list[float]) -> None:
    """``DataError`` unless ``fractions`` is one or two fractions in [0, 1] summing to at most 1."""
    if not 1 <= len(fractions) <= 2:
        raise DataError(f"--test_percent takes one or two fractions (dev [test]), got {len(fractions)}")
    if any(not 0 <= f <= 1 for f in fractions) or sum(fractions) > 1:
        raise DataError(f"--test_percent {' '.join(map(str, fractions))}: each must be a fraction in [0, 1] "
                        "(0.05 for 5%) and they must sum to at most 1")


def split_counts(total: int, fractions: list[float]) -> tuple[int, int, int]:
    """(train, dev, test) line counts: ``ceil`` of each held-out fraction of ``total``, the rest train."""
    check_fractions(fractions)
    # Rounded first so that float noise (0.07 * 100 = 7.000000000000001) does not add a line.
    dev = math.ceil(round(fractions[0] * total, 6))
    test = min(math.ceil(round(fractions[1] * total, 6)), total - dev) if len(fractions) == 2 else 0
    return total - dev - test, dev, test


def assign(total: int, counts: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """The line numbers (into the pooled index) of each split, in shuffled order."""
    order = np.random.default_rng(seed).permutation(total)
    _, dev, test = counts
    return {"dev": order[:dev], "test": order[dev:dev + test], "train": order[dev + test:]}


def output_paths(output_dir: str) -> dict[str, str]:
    """Each split's json file in ``output_dir`` (its map file is that path plus ``.map``)."""
    return {name: os.path.join(output_dir, f"{name}.json") for name in SPLITS}


def check_outputs(output_dir: str, force: bool) -> None:
    """``DataError`` when ``output_dir`` is unusable, or (without ``force``) an output already exists."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(f"--output_dir {output_dir} is a file, not a folder")
    if force:
        return
    for path in output_paths(output_dir).values():
        for out in (path, path + ".map"):
            if os.path.exists(out):
                raise DataError(f"{out} already exists; pass --overwrite to replace it, or choose another --output_dir")


def write_split(out, mapping, rows: np.ndarray, index: LineIndex, maps: list) -> None:
    """Write the lines ``rows`` of ``index`` (read from the mapped inputs ``maps``) and their map lines."""
    mapping.write(MAP_HEADER + "\n")
    for r in rows:
        f_idx = index.file[r]
        out.write(maps[f_idx][index.start[r]:index.end[r]])
        out.write(b"\n")
        mapping.write(f"{f_idx}\t{index.line[r]}\n")


def split_json(inputs: list[str], output_dir: str, fractions: list[float], seed: int,
               force: bool = False) -> dict[str, int]:
    """Split ``inputs`` into ``output_dir``; lines written per split."""
    from tqdm import tqdm

    check_fractions(fractions)
    check_outputs(output_dir, force)
    total_bytes = sum(os.path.getsize(p) for p in inputs if os.path.isfile(p))
    with tqdm(total=total_bytes, unit="B", unit_scale=True, mininterval=1.0, desc="reading") as bar:
        index = index_lines(inputs, bar.update)
    if not len(index):
        raise DataError(f"--input_files {' '.join(inputs)}: no json lines at all; nothing to split")
    rows = assign(len(index), split_counts(len(index), fractions), seed)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--output_dir {output_dir}: cannot create the folder ({exc.strerror})") from None
    remove_orphans(output_dir)  # what a killed run left
    targets = [p for path in output_paths(output_dir).values() for p in (path, path + ".map")]
    temps = {p: temporary_path(p) for p in targets}
    files = [open(p, "rb") for p in inputs]
    maps: list = []
    try:
        maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
                for f in files]
        for name, path in tqdm(output_paths(output_dir).items(), desc="writing", unit="file"):
            with open(temps[path], "wb") as out, open(temps[path + ".map"], "w", encoding="utf-8") as mapping:
                write_split(out, mapping, rows[name], index, maps)
        for path in targets:
            os.replace(temps[path], path)
    finally:
        for m in maps:
            if isinstance(m, mmap.mmap):
                m.close()
        for f in files:
            f.close()
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return {name: len(rows[name]) for name in SPLITS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_files", "--input-files", dest="input_files", nargs="+", required=True,
                        help="loose json files (one json object per line)")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                        help="folder for train.json, dev.json, test.json and their .map files")
    parser.add_argument("--test_percent", "--test-percent", dest="test_percent", type=float, nargs="+",
                        default=[0.05, 0.0], help="fraction of the lines for dev, then for test (default: 0.05 0)")
    parser.add_argument("--seed", type=int, default=1234, help="shuffling seed (default: 1234)")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="overwrite existing outputs")
    args = parser.parse_args(argv)
    written: dict[str, int] = {}
    status = run_cli(lambda: written.update(split_json(args.input_files, args.output_dir, args.test_percent,
                                                        args.seed, args.force)),
                     lambda exc: f"cannot write in --output_dir {args.output_dir}: {exc.strerror or exc}")
    if status:
        return status
    total = sum(written.values())
    for name, count in written.items():
        print(f"  {os.path.join(args.output_dir, name + '.json')}: {count} lines ({count / total:.1%})")
    print(f"split {total} lines of {len(args.input_files)} files with seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
