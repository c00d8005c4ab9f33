"""Splitting a document into sentences, the unit BERT's sentence pairs are made of.

Two modes, chosen by ``--presplit-sentences``:

- presplit: one sentence per non-empty line, stripped (``scripts/presplit_sentences_json.py`` writes
  corpora in that form once, so training does not split again);
- otherwise: every non-empty line (a paragraph) is split by nltk's Punkt splitter with its default
  English parameters plus the abbreviations in ``ABBREVIATIONS``. It is built in code, so it needs no
  downloaded nltk data (``nltk.download('punkt')`` is never required).

``splitter_identity(presplit)`` names the mode; tokenized caches are keyed by it, so switching modes,
or a new abbreviation list, gets a fresh cache.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from data_utils.errors import DataError

# Lower-case, without the final period, as Punkt stores them. Words that also end sentences as plain
# words ("no", "may", "co") are left out: a missed split costs less than a wrong join.
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "rev", "hon", "gen", "col", "lt", "capt", "sgt", "gov",
    "sen", "rep", "pres", "e.g", "i.e", "etc", "vs", "cf", "al", "approx", "dept", "fig", "figs", "vol", "vols",
    "ed", "eds", "pp", "inc", "ltd", "corp", "bros", "mt", "ft", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "a.m", "p.m", "u.s", "u.k", "u.n", "ph.d", "b.a", "m.a", "b.sc", "m.sc",
})


def splitter_identity(presplit: bool) -> str:
    """A string naming how documents are split, for cache keys."""
    if presplit:
        return "lines"
    make_punkt_splitter()  # one clear error when nltk is missing
    import nltk

    abbrevs = hashlib.sha256(" ".join(sorted(ABBREVIATIONS)).encode()).hexdigest()[:8]
    return f"punkt:nltk-{nltk.__version__}:abbrev-{abbrevs}"


def make_punkt_splitter() -> Any:
    """A fresh Punkt sentence splitter with English abbreviations; reads no nltk data."""
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError:
        raise DataError(
            "splitting documents into sentences needs nltk (`pip install nltk`), or a corpus with one sentence "
            "per line and --presplit-sentences"
        ) from None
    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


@functools.lru_cache(maxsize=1)
def _punkt() -> Any:
    return make_punkt_splitter()


def split_sentences(text: str, presplit: bool = False) -> list[str]:
    """The non-empty, stripped sentences of ``text``; lines always separate sentences."""
    lines = [line.strip() for line in text.splitlines()]
    if presplit:
        return [line for line in lines if line]
    splitter = _punkt()
    return [s.strip() for line in lines if line for s in splitter.tokenize(line) if s.strip()]
