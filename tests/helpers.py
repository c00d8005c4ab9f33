"""Builders shared by the tests (no tests here): tiny vocabularies, stand-in tokenizers, corpora, pretraining runs.

Every test module imports what it shares with another from here, never from another test module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from data_utils.tokenization import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CACHE = os.path.join(REPO, "cache")

# Tiny GPT-2-format table: the 256 byte tokens, then these merges (ids 256..), then <|endoftext|>.
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("Ġ", "w"), ("o", "r")]


def gpt2_byte_chars() -> list[str]:
    """The 256 byte tokens in GPT-2 id order (printable bytes first, the others shifted past 255)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(shifted))]


def write_tiny_gpt2(folder: str, vocab_name: str = "vocab.json", merges_name: str = "merges.txt",
                    merges: Sequence[tuple[str, str]] = TINY_MERGES) -> tuple[str, str]:
    """Write a small but real byte-level BPE vocab.json/merges.txt pair; returns their paths."""
    tokens = gpt2_byte_chars() + [a + b for a, b in merges] + ["<|endoftext|>"]
    vocab_path, merges_path = os.path.join(folder, vocab_name), os.path.join(folder, merges_name)
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


class ByteTokenizer(Tokenizer):
    """ids = UTF-8 bytes, eod = 256; counts encode calls so tests can see whether a corpus was tokenized."""

    name = "ByteTokenizer"

    def __init__(self, vocab_size: int = 257, tag: str = "") -> None:
        self._vocab_size, self.tag, self.calls = vocab_size, tag, 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return 256

    @property
    def identity(self) -> str:
        return f"{self.name}:{self._vocab_size}:{self.tag}"


def write_jsonl(path: str, texts: Sequence[str], key: str = "text") -> str:
    """Loose json with one ``{key: text}`` per line; returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}) + "\n")
    return str(path)
