"""Undo the word-level tokenization of evaluation corpora before they meet a subword tokenizer.

WikiText's ``.tokens`` files are space-separated words: ``1 @,@ 000``, ``well @-@ known``,
``( see below )``, ``John 's``, headings as `` = = Reception = = ``. A byte-level BPE model was
trained on ordinary text, so perplexity is measured on the text put back together, and the word
count of the raw file is kept to rescale the loss (``adjusted_ppl`` in ``evaluate_gpt2.py``).
"""

from __future__ import annotations

import re

_DEGREE = chr(176)

# (pattern, replacement, is_regex), applied in this order; the order matters (e.g. the bracket
# rules expect the punctuation already attached, the heading rules go from four ``=`` down to two).
WIKITEXT_RULES: tuple[tuple[str, str, bool], ...] = (
    # contractions
    ("s '", "s'", False),
    # number separators
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    # punctuation takes no space before it
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    # no spaces just inside brackets and quotes
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    # headings, degrees, line edges, the number placeholder, possessives
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" " + _DEGREE + " ", _DEGREE, False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def wikitext_detokenize(text: str) -> str:
    """``text`` from a WikiText ``.tokens`` file as ordinary prose, by the Megatron-LM (2019) rules.

    The rules (``WIKITEXT_RULES``) are plain string replacements and a few regular expressions,
    applied once each in a fixed order; the result is what GPT-2-style zero-shot perplexity
    numbers on WikiText are computed on.
    """
    for pattern, replacement, is_regex in WIKITEXT_RULES:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text
