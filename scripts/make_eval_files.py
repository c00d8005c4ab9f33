"""Evaluation files in the three formats evaluate_gpt2.py reads, from documents of a loose-json corpus.

    python scripts/make_eval_files.py --input cache/shakespeare.json --output-prefix shakespeare.test \\
        [--first-doc -40] [--docs 40] [--passages 200] [--passage-words 60] [--text-key text] [--overwrite]

writes, from documents ``[first-doc, first-doc + docs)`` of ``--input`` (negative counts from the end, so the
default takes the last 40: documents a training run on the rest of the file has not seen):

* ``PREFIX.tokens``: WikiText style, what ``evaluate_gpt2.py`` (default mode) reads: each document under a
  `` = Title = `` heading (its first line), its lines joined into one paragraph, words and punctuation
  separated by spaces, ``-``/``,``/``.`` inside words and numbers as `` @-@ `` / `` @,@ `` / `` @.@ ``,
  possessive `` 's``: the word-level tokenization that ``data_utils/detokenizers.py`` undoes;
* ``PREFIX.lambada.jsonl``: LAMBADA style (``--cloze-eval``): up to ``--passages`` passages of
  ``--passage-words`` words taken in order from the documents, each ending on a purely alphabetic word,
  one ``{"text": ...}`` per line;
* ``PREFIX.json``: the documents as loose json (``--webtext-eval``).

Existing outputs are refused unless ``--overwrite``; each file appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import atomic_file, check_new_file  # noqa: E402
from errors import DataError  # noqa: E402
from initialize import run_cli  # noqa: E402

_INNER = re.compile(r"(?<=\w)([-,.])(?=\w)")  # a hyphen, comma or point between word characters
_PUNCT = re.compile(r"([!?;:()\[\]\"]|,(?!\S*@)|\.(?=\s|$))")


def wikitext_tokenize(line: str) -> str:
    """``line`` in WikiText's word-level form (see the module docstring)."""
    text = _INNER.sub(lambda m: f" @{m.group(1)}@ ", line)
    text = re.sub(r"(\w)'s\b", r"\1 's", text)
    text = _PUNCT.sub(r" \1 ", text)
    return " ".join(text.split())


def read_documents(path: str, text_key: str) -> list[str]:
    """The non-empty ``text_key`` values of a loose-json file, in order (``FILE:LINE`` on a bad line)."""
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: not a json object with a {text_key!r} string") from None
            if isinstance(text, str) and text.strip():
                documents.append(text)
    return documents


def lambada_passages(documents: list[str], words_per_passage: int, limit: int) -> list[str]:
    """Consecutive ``words_per_passage``-word passages of the documents' words, each ending on an
    alphabetic word (a passage whose last word is not one is shortened to the last that is)."""
    words = [word for document in documents for word in document.split()]
    passages = []
    start = 0
    while start + words_per_passage <= len(words) and len(passages) < limit:
        end = start + words_per_passage
        while end > start + words_per_passage // 2 and not words[end - 1].isalpha():
            end -= 1
        if words[end - 1].isalpha():
            passages.append(" ".join(words[start:end]))
        start += words_per_passage
    return passages


def make_eval_files(source: str, prefix: str, first_doc: int, docs: int, passages: int, passage_words: int,
                    text_key: str, overwrite: bool) -> dict[str, int]:
    outputs = {kind: f"{prefix}{suffix}" for kind, suffix in
               (("tokens", ".tokens"), ("lambada", ".lambada.jsonl"), ("json", ".json"))}
    for path in outputs.values():
        check_new_file(path, "--output-prefix", overwrite)
    documents = read_documents(source, text_key)
    chosen = documents[first_doc:][:docs]
    if not chosen:
        raise DataError(f"{source}: holds {len(documents)} documents; --first-doc {first_doc} --docs {docs} selects "
                        "none")
    with atomic_file(outputs["tokens"]) as f:
        for index, document in enumerate(chosen):
            lines = [line.strip() for line in document.splitlines() if line.strip()]
            title = wikitext_tokenize(lines[0])[:80] if len(lines) > 1 else f"Document {index + 1}"
            body = lines[1:] if len(lines) > 1 else lines
            f.write(f" \n = {title} = \n \n {wikitext_tokenize(' '.join(body))} \n")
    cloze = lambada_passages(chosen, passage_words, passages)
    with atomic_file(outputs["lambada"]) as f:
        f.writelines(json.dumps({"text": passage}) + "\n" for passage in cloze)
    with atomic_file(outputs["json"]) as f:
        f.writelines(json.dumps({text_key: document}) + "\n" for document in chosen)
    return {"documents": len(chosen), "passages": len(cloze)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="loose-json corpus (one json object a line)")
    parser.add_argument("--output-prefix", required=True, help="PREFIX of PREFIX.tokens, .lambada.jsonl, .json")
    parser.add_argument("--first-doc", type=int, default=-40, help="first document (negative: from the end)")
    parser.add_argument("--docs", type=int, default=40, help="how many documents")
    parser.add_argument("--passages", type=int, default=200, help="LAMBADA-style passages at most")
    parser.add_argument("--passage-words", type=int, default=60, help="words per LAMBADA-style passage")
    parser.add_argument("--text-key", default="text", help="json key of the document text")
    parser.add_argument("--overwrite", "--force", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    for flag in ("docs", "passages", "passage_words"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    counts: dict[str, int] = {}
    status = run_cli(lambda: counts.update(make_eval_files(
        args.input, args.output_prefix, args.first_doc, args.docs, args.passages, args.passage_words,
        args.text_key, args.overwrite)))
    if status:
        return status
    print(f"wrote {args.output_prefix}.tokens ({counts['documents']} documents), {args.output_prefix}.json and "
          f"{args.output_prefix}.lambada.jsonl ({counts['passages']} passages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
