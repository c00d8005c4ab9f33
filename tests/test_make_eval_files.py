"""scripts/make_eval_files.py: WikiText-, LAMBADA- and loose-json evaluation files from held-out documents,
in the forms evaluate_gpt2.py reads; the WikiText form is what the 2019 detokenizer undoes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from data_utils.detokenizers import wikitext_detokenize
from tests.cli import assert_one_line_error
from tests.helpers import REPO

DOCS = ["Act One\nWell-known, it's 1,000.5 miles; (see below): \"yes\" he said!\nO Romeo, Romeo!",
        "Act Two\nThe king's men came at 3.30 and stood before the gate of the old castle walls",
        "A single line without a title, ending on a number 42"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/make_eval_files.py", *args], cwd=REPO, capture_output=True,
                          text=True)


def test_held_out_documents_become_the_three_evaluation_formats(tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in ["not chosen"] + DOCS))
    prefix = str(tmp_path / "held")
    proc = _run("--input", str(corpus), "--output-prefix", prefix, "--first-doc", "-3", "--passage-words", "8")
    assert proc.returncode == 0, proc.stderr
    tokens = open(prefix + ".tokens").read()
    assert " = Act One = " in tokens and " = Document 3 = " in tokens and "not chosen" not in tokens
    assert "Well @-@ known , it 's 1 @,@ 000 @.@ 5 miles ;" in tokens
    # The 2019 detokenizer gives the prose back.
    assert "Well-known, it's 1,000.5 miles; (see below): \"yes\" he said! O Romeo, Romeo!" in \
        wikitext_detokenize(tokens)
    passages = [json.loads(line)["text"] for line in open(prefix + ".lambada.jsonl")]
    assert passages and all(p.split()[-1].isalpha() and 4 <= len(p.split()) <= 8 for p in passages)
    assert [json.loads(line)["text"] for line in open(prefix + ".json")] == DOCS
    # Existing outputs are refused in one line unless --overwrite; nothing is touched.
    before = os.path.getmtime(prefix + ".tokens")
    proc = _run("--input", str(corpus), "--output-prefix", prefix)
    assert_one_line_error(proc.returncode, proc.stderr, "already exists", "--overwrite")
    assert os.path.getmtime(prefix + ".tokens") == before
    assert _run("--input", str(corpus), "--output-prefix", prefix, "--overwrite").returncode == 0
