"""scripts/split_json.py: seeded train/dev/test split of loose json, with .map files back to the input lines."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest

from tests.cli import assert_one_line_error
from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "scripts", "split_json.py")
OUTPUTS = sorted(f"{name}.json{ext}" for name in ("train", "dev", "test") for ext in ("", ".map"))


def load_script():
    spec = importlib.util.spec_from_file_location("split_json", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = load_script().main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def inputs(tmp_path):
    """Two loose-json files: unicode, escapes, key order and spacing kept as written, a blank line, a CRLF line
    and a last line without a newline."""
    a = tmp_path / "a.json"
    lines_a = [json.dumps({"text": f"doc {i} " + "é" * (i % 3), "n": i}, ensure_ascii=i % 2 == 0) for i in range(137)]
    a.write_bytes(("\n".join(lines_a[:50]) + "\n\n" + "\n".join(lines_a[50:]) + "\n").encode())
    b = tmp_path / "b.json"
    b.write_bytes(b'{ "z": 1,  "text": "spaced"}\r\n{"text": "x\\ny"}\n{"text": "no newline"}')
    return [str(a), str(b)]


def read_lines(path) -> list[bytes]:
    """Non-blank lines without their "\\n" (a "\\r" stays)."""
    with open(path, "rb") as f:
        return [line.removesuffix(b"\n") for line in f if line.strip()]


def read_outputs(folder) -> dict[str, tuple[list[bytes], list[tuple[int, int]]]]:
    result = {}
    for name in ("train", "dev", "test"):
        path = os.path.join(folder, f"{name}.json")
        with open(path + ".map", encoding="utf-8") as f:
            header, *rows = f.read().splitlines()
        assert header == "file\tline #"
        result[name] = (read_lines(path), [tuple(int(x) for x in row.split("\t")) for row in rows])
    return result


def test_split_respects_fractions_and_keeps_every_line_once(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["--input_files", *inputs, "--output_dir", str(out), "--test_percent", "0.11", "0.03"],
                            capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == OUTPUTS  # no temporary left
    total = 137 + 3
    got = read_outputs(out)
    dev, test = 16, 5  # 11% and 3% of 140 lines (15.4 and 4.2), each rounded up
    assert {name: len(lines) for name, (lines, _) in got.items()} == {"train": total - dev - test, "dev": dev,
                                                                     "test": test}
    assert all(len(lines) == len(rows) for lines, rows in got.values())
    every_input = [line for path in inputs for line in read_lines(path)]
    assert Counter(line for lines, _ in got.values() for line in lines) == Counter(every_input)
    assert f"dev.json: {dev} lines" in stdout
    assert load_script().split_counts(100, [0.07]) == (93, 7, 0)  # 0.07 * 100 is 7.000000000000001 in floats


def test_maps_point_to_the_input_lines(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["--input_files", *inputs, "--output_dir", str(out), "--test_percent", "0.2", "0.3"], capsys)[0] == 0
    physical = []
    for path in inputs:
        with open(path, "rb") as f:
            physical.append([line.removesuffix(b"\n") for line in f])
    seen = set()
    for lines, rows in read_outputs(out).values():
        for line, (f_idx, l_idx) in zip(lines, rows, strict=True):
            assert physical[f_idx][l_idx] == line
            seen.add((f_idx, l_idx))
    assert (0, 50) not in seen and (0, 51) in seen  # the blank line is dropped, the one after it counted
    assert len(seen) == 140 and (1, 2) in seen


def test_same_seed_same_files_other_seed_other_files(inputs, tmp_path, capsys):
    def split(folder, seed):
        assert run(["--input_files", *inputs, "--output_dir", str(folder), "--seed", seed], capsys)[0] == 0
        return {name: (folder / name).read_bytes() for name in OUTPUTS}

    first, again, other = split(tmp_path / "a", "7"), split(tmp_path / "b", "7"), split(tmp_path / "c", "8")
    assert first == again
    assert first["train.json"] != other["train.json"] and first["dev.json"] != other["dev.json"]
    assert sorted(first["dev.json"].splitlines()) != sorted(other["dev.json"].splitlines())  # not just reordered
    assert first["test.json"] == b"" and first["test.json.map"] == b"file\tline #\n"  # default 0.05 0
    assert len(first["dev.json"].splitlines()) == math.ceil(0.05 * 140)


def test_existing_outputs_are_refused_without_force(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["--input_files", *inputs, "--output_dir", str(out)], capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    code, _, err = run(["--input_files", *inputs, "--output_dir", str(out), "--seed", "9"], capsys)
    assert_one_line_error(code, err, str(out / "train.json"), "--overwrite")
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before
    code, _, err = run(["--input_files", *inputs, "--output_dir", str(out), "--seed", "9", "--force"], capsys)
    assert code == 0, err
    assert (out / "train.json").read_bytes() != before["train.json"] and sorted(os.listdir(out)) == OUTPUTS


@pytest.mark.parametrize("fractions, fragment", [(["0.5", "0.6"], "sum to at most 1"), (["5"], "(0.05 for 5%)"),
                                                 (["0.1", "0.1", "0.1"], "one or two fractions")])
def test_bad_fractions(inputs, tmp_path, capsys, fractions, fragment):
    code, _, err = run(["--input_files", *inputs, "--output_dir", str(tmp_path / "out"), "--test_percent",
                        *fractions], capsys)
    assert_one_line_error(code, err, "--test_percent", fragment)
    assert not os.path.exists(tmp_path / "out")


def test_command_line_malformed_line_stops_with_one_line(inputs, tmp_path, capsys):
    with open(inputs[0], "a", encoding="utf-8") as f:
        f.write('{"text": "fine"}\n["a list"]\n')
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--input-files", *inputs, "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, f"{inputs[0]}:140: expected a json object, got list")
    assert not os.path.exists(out)
    with open(inputs[1], "a", encoding="utf-8") as f:
        f.write('\n{"text": broken}\n')
    code, _, err = run(["--input-files", inputs[1], "--output-dir", str(out)], capsys)
    assert_one_line_error(code, err, f"{inputs[1]}:4: not valid JSON")
    assert not os.path.exists(out)
