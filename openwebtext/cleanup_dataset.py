"""Repair the unicode of downloaded pages and keep the long documents of one language.

    python openwebtext/cleanup_dataset.py INPUT.json OUTPUT.json [--overwrite] [--text-key text]
        [--min-tokens 128] [--language en] [--seed 0]
        [--tokenizer-type GPT2BPETokenizer] [--vocab-file F --merge-file F | --cache-dir cache]

Reads loose json (one object per line, the page under ``--text-key``) and writes the documents kept,
in input order, with every other key unchanged. Each document goes through, in order:

1. ``ftfy.fix_text``: mojibake (UTF-8 read as Latin-1/cp1252, ``cafÃ©`` -> ``café``), HTML entities
   left in text, broken quotes and line breaks are repaired; surrounding whitespace is stripped.
   Dropped as **empty** when nothing is left;
2. dropped as **under N tokens** when the tokenizer makes fewer than ``--min-tokens`` tokens of it
   (the project's tokenizers: ``--tokenizer-type`` with ``--vocab-file``/``--merge-file`` or the files
   in ``--cache-dir``, as for training);
3. ``langdetect`` names its language; dropped as **not LANG** when it is another (the report counts
   each language found) and as **language unknown** when nothing in it is a letter. langdetect samples
   at random; ``--seed`` fixes it, so the same input always gives the same output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils import make_tokenizer  # noqa: E402
from openwebtext.common import (  # noqa: E402
    atomic_output,
    byte_progress,
    check_output,
    print_report,
    read_documents,
    require_file,
    run_cli,
)

MIN_TOKENS = 128
TOKENIZER_TYPES = ("GPT2BPETokenizer", "BertWordPieceTokenizer", "CharacterLevelTokenizer")
EMPTY, UNKNOWN_LANGUAGE = "empty", "language unknown"


def detect_language(text: str) -> str | None:
    """langdetect's language code for ``text`` (``en``, ``de``, ``zh-cn``...), or None when it finds no letters.

    Deterministic only once ``langdetect.DetectorFactory.seed`` is set (``cleanup`` does).
    """
    from langdetect import detect
    from langdetect.lang_detect_exception import LangDetectException

    try:
        return detect(text)
    except LangDetectException:
        return None


class Cleaner:
    """The three steps of the module docstring for one document at a time, counting what each dropped."""

    def __init__(self, count_tokens, min_tokens: int = MIN_TOKENS, language: str = "en") -> None:
        self.count_tokens, self.min_tokens, self.language = count_tokens, min_tokens, language
        self.dropped: Counter[str] = Counter()
        self.languages: Counter[str] = Counter()  # of the documents dropped for their language
        self.fixed = 0

    def clean(self, text: str) -> str | None:
        """The repaired text of a document to keep, or None (the reason counted in ``dropped``)."""
        import ftfy

        fixed = ftfy.fix_text(text)
        self.fixed += fixed != text
        fixed = fixed.strip()
        if not fixed:
            self.dropped[EMPTY] += 1
            return None
        if self.count_tokens(fixed) < self.min_tokens:
            self.dropped[f"under {self.min_tokens} tokens"] += 1
            return None
        language = detect_language(fixed)
        if language is None:
            self.dropped[UNKNOWN_LANGUAGE] += 1
            return None
        if language != self.language:
            self.dropped[f"not {self.language}"] += 1
            self.languages[language] += 1
            return None
        return fixed


def cleanup(src: str, dst: str, cleaner: Cleaner, text_key: str = "text") -> tuple[int, int]:
    """Write the documents of ``src`` that ``cleaner`` keeps to ``dst``; returns (read, kept)."""
    read = kept = 0
    with atomic_output(dst) as out, byte_progress([src], f"cleaning {os.path.basename(src)}") as bar:
        for _, _, record in read_documents(src, text_key, on_bytes=bar.update):
            read += 1
            text = cleaner.clean(record[text_key])
            if text is not None:
                record[text_key] = text
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                kept += 1
    return read, kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="loose json of downloaded pages")
    parser.add_argument("output", help="where to write the documents kept")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace OUTPUT if it exists")
    parser.add_argument("--text-key", default="text", help="json key of the page text (default: text)")
    parser.add_argument("--min-tokens", type=int, default=MIN_TOKENS,
                        help=f"drop documents with fewer tokens (default {MIN_TOKENS})")
    parser.add_argument("--language", default="en", help="langdetect code of the language to keep (default: en)")
    parser.add_argument("--seed", type=int, default=0, help="langdetect's seed (default 0)")
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES,
                        help="tokenizer that counts --min-tokens (default: GPT2BPETokenizer)")
    parser.add_argument("--vocab-file", default=None, help="vocabulary file (GPT2 vocab.json or BERT vocab.txt)")
    parser.add_argument("--merge-file", default=None, help="GPT2 BPE merges.txt")
    parser.add_argument("--cache-dir", default="cache", help="where to find the vocabulary files otherwise")
    args = parser.parse_args(argv)
    if args.min_tokens < 0:
        parser.error(f"--min-tokens must not be negative, got {args.min_tokens}")

    require_file(args.input, "INPUT")
    check_output(args.output, args.force, [args.input], "OUTPUT")
    from langdetect import DetectorFactory

    DetectorFactory.seed = args.seed
    tokenizer = make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    cleaner = Cleaner(lambda text: len(tokenizer.encode(text)), args.min_tokens, args.language)
    read, kept = cleanup(args.input, args.output, cleaner, args.text_key)
    languages = ", ".join(f"{lang} {n}" for lang, n in sorted(cleaner.languages.items(), key=lambda x: (-x[1], x[0])))
    notes = [f"repaired by ftfy: {cleaner.fixed}"] + ([f"languages dropped: {languages}"] if languages else [])
    print_report("cleanup_dataset", read, kept, cleaner.dropped, notes=notes + [f"wrote {args.output}"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
