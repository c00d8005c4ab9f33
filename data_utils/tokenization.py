"""Tokenizers behind one small interface: GPT-2 BPE, BERT WordPiece, SentencePiece, raw bytes.

``make_tokenizer(tokenizer_type, vocab_file, merge_file, cache_dir, *, model_type, tokenizer_path,
vocab_size, train_files, text_key)`` returns an object with ``encode(text) -> list[int]`` (no special
tokens added), ``decode(ids) -> str``, ``vocab_size`` (unpadded), ``eod`` (the id appended after every
document), ``name`` and ``identity`` (a string that changes whenever the ids could change; caches of
tokenized corpora are keyed by it). The BERT-style tokenizers also expose the int ids ``pad``, ``cls``,
``sep`` and ``mask``, with ``eod == sep``.

- ``GPT2BPETokenizer``: ``--vocab-file``/``--merge-file``, else ``gpt2-vocab.json`` and
  ``gpt2-merges.txt`` in ``cache_dir`` (OpenAI GPT-2 format).
- ``BertWordPieceTokenizer``: ``model_type`` (``--tokenizer-model-type``) such as ``bert-large-uncased``
  or ``bert-base-cased`` picks lower-casing + accent stripping (``*uncased*``, also the default when
  there is none) or neither (``*cased*``). The ``vocab.txt`` is ``--vocab-file``, else the first of
  ``<model-type>-vocab.txt`` and, for the English base/large models, which share one vocabulary,
  ``bert-uncased-vocab.txt`` / ``bert-cased-vocab.txt`` in ``cache_dir``. A ``model_type`` that is a
  folder (a Hugging Face BERT's, as ``--pretrained-bert`` reads) gives its ``vocab.txt`` instead, and
  the casing of its ``tokenizer_config.json`` (``do_lower_case``, default true). Ids equal
  ``transformers``' ``BertTokenizerFast`` on the same file.
- ``SentencePieceTokenizer``: the model ``<stem>.model`` (``<stem>.vocab`` beside it), where ``<stem>``
  is ``tokenizer_path`` less a trailing ``.model``. An existing model is always reused. A missing one is
  trained once (by global rank 0 under torch.distributed, the others wait) on ``train_files``: one
  sentencepiece sentence per non-empty line of each loose json document, at most
  ``SPM_MAX_SENTENCES`` of them sampled at random, ``vocab_size`` pieces (default 30522 through
  ``make_tokenizer``), ``model_type`` in ``bpe`` (default), ``unigram``, ``char``, ``word``. Ids 0..4
  are ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``; all but ``[UNK]`` are control symbols, so
  ``encode`` of any text never yields them.
- ``CharacterLevelTokenizer``: the UTF-8 bytes of the text (ids 0..255), then ``[PAD]`` 256,
  ``[CLS]`` 257, ``[SEP]`` 258, ``[MASK]`` 259.

``python tools/fetch_sample_data.py --cache-dir DIR`` writes the GPT-2 pair and ``bert-uncased-vocab.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.distributed as dist

import mpu
from data_utils.coordination import once_per_group
from data_utils.corpora import read_texts
from data_utils.errors import DataError

GPT2_VOCAB_NAME = "gpt2-vocab.json"
GPT2_MERGES_NAME = "gpt2-merges.txt"
BERT_VOCAB_NAME = "bert-uncased-vocab.txt"
BERT_CASED_VOCAB_NAME = "bert-cased-vocab.txt"
BERT_SHARED_VOCAB_MODELS = ("bert-base-uncased", "bert-large-uncased", "bert-base-cased", "bert-large-cased")
GPT2_EOD_TOKEN = "<|endoftext|>"
FETCH_HINT = "python tools/fetch_sample_data.py --cache-dir DIR"
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
SPM_MODEL_TYPES = ("bpe", "unigram", "char", "word")
SPM_DEFAULT_VOCAB_SIZE = 30522
SPM_MAX_SENTENCES = 1_000_000  # sampled when a corpus has more lines: bounds training memory and time
SPM_SEED = 1234


class Tokenizer(ABC):
    """What the data path needs from a tokenizer."""

    name: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids in the vocabulary, before any padding for model parallelism."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended after every document."""

    @property
    def identity(self) -> str:
        """A string that differs between tokenizers that could give different ids."""
        return self.name

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; subclasses may parallelise."""
        return [self.encode(text) for text in texts]


def _hash_files(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _find_file(explicit: str | None, cache_dir: str | None, names: Sequence[str], what: str,
               tokenizer_type: str, flag: str, fetches: str = "") -> str:
    """The explicit path if given, else the first of ``names`` in ``cache_dir``; DataError naming all tried."""
    tried = []
    if explicit is not None:
        if os.path.isfile(explicit):
            return explicit
        tried.append(explicit)
    elif cache_dir is not None:
        for name in names:
            candidate = os.path.join(cache_dir, name)
            if os.path.isfile(candidate):
                return candidate
            tried.append(candidate)
    where = ", ".join(tried) if tried else f"nothing (no {flag} and no --cache-dir)"
    raise DataError(
        f"{tokenizer_type} needs its {what}: tried {where}; pass {flag} PATH or run "
        f"`{FETCH_HINT}`{fetches} and pass --cache-dir DIR"
    )


class _TokenizersBacked(Tokenizer):
    """The shared half of the tokenizers-library backends: ``self._tok`` and ``self._identity``."""

    _tok: Any
    _identity: str

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def identity(self) -> str:
        return self._identity


def _bpe_file_fault(vocab_file: str, merge_file: str) -> str | None:
    """What is wrong with a GPT-2 vocabulary/merges pair, naming the file and line; None if nothing is found."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except OSError as exc:
        return f"cannot read GPT-2 vocabulary {vocab_file}: {exc.strerror}"
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else f"not UTF-8: {exc.reason}"
        return f"cannot read GPT-2 vocabulary {vocab_file}: not a json object token -> id ({why})"
    if not isinstance(vocab, dict):
        return f"cannot read GPT-2 vocabulary {vocab_file}: not a json object token -> id"
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return f"cannot read GPT-2 merges {merge_file}: {exc.strerror}"
    except UnicodeDecodeError as exc:
        return f"{merge_file}: not UTF-8 ({exc.reason} at byte {exc.start})"
    for lineno, line in enumerate(lines, start=1):
        if (lineno == 1 and line.startswith("#version")) or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            shown = repr(line[:40]) + ("..." if len(line) > 40 else "")
            return f"{merge_file}:{lineno}: expected two tokens separated by one space, found {shown}"
        missing = [t for t in (*pair, "".join(pair)) if t not in vocab]
        if missing:
            return f"{merge_file}:{lineno}: {missing[0]!r} is not in the vocabulary {vocab_file}; the two files " \
                   "do not belong together"
    return None


class GPT2BPETokenizer(_TokenizersBacked):
    """OpenAI GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; same ids as GPT-2."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:  # tokenizers raises a bare Exception on unreadable files
            # Its message counts merges lines without the "#version" header; find the file's own line number.
            fault = _bpe_file_fault(vocab_file, merge_file) or f"cannot read GPT-2 vocabulary {vocab_file} / " \
                                                                 f"merges {merge_file}: {exc}"
            raise DataError(f"{fault}; regenerate them with `{FETCH_HINT}`") from None
        self._tok = HFTokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tok.decoder = decoders.ByteLevel()
        eod = self._tok.token_to_id(GPT2_EOD_TOKEN)
        if eod is None:
            raise DataError(f"{vocab_file} has no {GPT2_EOD_TOKEN!r} token; regenerate it with `{FETCH_HINT}`")
        self._eod = eod
        self._identity = f"{self.name}:{_hash_files(vocab_file, merge_file)}"
        self.vocab_file, self.merge_file = vocab_file, merge_file

    @property
    def eod(self) -> int:
        return self._eod


class BertWordPieceTokenizer(_TokenizersBacked):
    """BERT WordPiece from a ``vocab.txt``; ``eod`` is ``[SEP]``. Special ids: ``cls``, ``sep``, ``mask``, ``pad``.

    ``lower_case`` lower-cases and strips accents (the uncased models); without it the text keeps both
    (the cased models). CJK characters are split into single characters and control characters
    dropped, as Google's BERT does, so the ids equal ``transformers``' ``BertTokenizerFast``.
    """

    name = "BertWordPieceTokenizer"

    def __init__(self, vocab_file: str, lower_case: bool = True) -> None:
        from tokenizers import BertWordPieceTokenizer as HFWordPiece

        try:
            self._tok = HFWordPiece(vocab_file, clean_text=True, handle_chinese_chars=True,
                                    strip_accents=lower_case, lowercase=lower_case)
        except Exception as exc:
            raise DataError(f"cannot read WordPiece vocabulary {vocab_file}: {exc}; pass a BERT vocab.txt") from exc
        ids = {tok: self._tok.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise DataError(f"{vocab_file} lacks the special tokens {missing}; pass a BERT vocab.txt")
        self.pad, self.cls, self.sep, self.mask = (ids[tok] for tok in SPECIAL_TOKENS)
        self.vocab_file, self.lower_case = vocab_file, lower_case
        casing = "lower+strip-accents" if lower_case else "cased"
        self._identity = f"{self.name}:{casing}:{_hash_files(vocab_file)}"

    @property
    def eod(self) -> int:
        return self.sep


def bert_lower_case(model_type: str | None) -> bool:
    """Whether ``--tokenizer-model-type`` names an uncased BERT (the default when there is none)."""
    if model_type is None or "uncased" in model_type:
        return True
    if "cased" in model_type:
        return False
    raise DataError(
        f"--tokenizer-model-type {model_type!r} does not say whether BertWordPieceTokenizer lower-cases; "
        "give a BERT name with 'uncased' or 'cased' in it, such as bert-large-uncased or bert-base-cased"
    )


def hf_folder_lower_case(folder: str) -> bool:
    """``do_lower_case`` of a Hugging Face folder's ``tokenizer_config.json`` (true, its default, without one)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return True
    try:
        with open(path) as f:
            return bool(json.load(f).get("do_lower_case", True))
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: unreadable ({err}); fix or remove it") from None


def bert_vocab_names(model_type: str | None) -> list[str]:
    """File names looked up in the cache folder for ``model_type``, in order."""
    if model_type is None:
        return [BERT_VOCAB_NAME]
    names = [f"{model_type}-vocab.txt"]
    if model_type.startswith(BERT_SHARED_VOCAB_MODELS):  # English base and large share one vocabulary
        names.append(BERT_VOCAB_NAME if bert_lower_case(model_type) else BERT_CASED_VOCAB_NAME)
    return names


def sentencepiece_files(tokenizer_path: str) -> tuple[str, str]:
    """``(<stem>.model, <stem>.vocab)`` where ``<stem>`` is ``tokenizer_path`` less a trailing ``.model``."""
    stem = tokenizer_path[:-len(".model")] if tokenizer_path.endswith(".model") else tokenizer_path
    return stem + ".model", stem + ".vocab"


class _TrainingLines:
    """The stripped non-empty lines of every document of loose json files, counted.

    Keeps the first error it raises: sentencepiece turns an exception inside its sentence iterator
    into a bare ``RuntimeError``, which would lose the file and line of a malformed record.
    """

    def __init__(self, files: Sequence[str], text_key: str) -> None:
        self.files, self.text_key = list(files), text_key
        self.count, self.error = 0, None

    def __iter__(self) -> Iterator[str]:
        try:
            for path in self.files:
                for text in read_texts(path, self.text_key):
                    for line in text.splitlines():
                        if line.strip():
                            self.count += 1
                            yield line.strip()
        except Exception as exc:
            self.error = exc
            raise


def _check_training_request(model_file: str, files: Sequence[str], vocab_size: Any, model_type: str) -> None:
    """One DataError line for a request sentencepiece cannot train from."""
    if not files:
        raise DataError(f"SentencePiece model {model_file} does not exist and there is no training data to train "
                        "one from; pass --train-data, or --tokenizer-path of an existing model")
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise DataError(f"cannot train SentencePiece model {model_file}: no such file {', '.join(missing)}; "
                        "check --train-data")
    if model_type not in SPM_MODEL_TYPES:
        raise DataError(f"cannot train SentencePiece model {model_file}: unknown model type {model_type!r}; known: "
                        f"{', '.join(SPM_MODEL_TYPES)} (--tokenizer-model-type)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS) + 1:
        raise DataError(f"SentencePiece model {model_file} needs a vocabulary size above {len(SPECIAL_TOKENS) + 1} "
                        f"(the reserved tokens and [UNK]) to be trained, got {vocab_size!r}; pass --vocab-size N")


def _training_failure(model_file: str, lines: _TrainingLines, exc: Exception) -> DataError:
    """sentencepiece's error as one actionable line (without its source file and check expression)."""
    if lines.count == 0:
        return DataError(f"cannot train SentencePiece model {model_file}: no text in {', '.join(lines.files)}; "
                         "check --train-data and --text-key")
    reason = " ".join(str(exc).split()) or type(exc).__name__
    reason = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", reason)  # "INTERNAL: x.cc(744) [check] why" -> "why"
    hint = "change --vocab-size" if "ocabulary size" in reason else "check --train-data and --tokenizer-model-type"
    return DataError(f"cannot train SentencePiece model {model_file} on {lines.count} lines of "
                     f"{', '.join(lines.files)}: {reason}; {hint}")


def train_sentencepiece(model_file: str, vocab_file: str, files: Sequence[str], vocab_size: int,
                        model_type: str | None = None, text_key: str = "text") -> None:
    """Train a model on the lines of loose json ``files``; write ``model_file`` and ``vocab_file`` atomically.

    Both are written under a temporary folder beside ``model_file``, then renamed into place (the
    ``.model`` last, as its presence means "trained"), so an interrupted run leaves no half files.
    """
    spm = _sentencepiece()
    model_type = model_type or "bpe"
    _check_training_request(model_file, files, vocab_size, model_type)
    lines = _TrainingLines(files, text_key)
    folder = os.path.dirname(os.path.abspath(model_file))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".spm-train-", dir=folder)
    try:
        prefix = os.path.join(tmp, "spm")
        spm.set_random_generator_seed(SPM_SEED)  # the sampling of long corpora is then reproducible
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                input_sentence_size=SPM_MAX_SENTENCES, shuffle_input_sentence=True,
                pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
                control_symbols=list(SPECIAL_TOKENS[1:]), minloglevel=2,
            )
        except RuntimeError as exc:
            if lines.error is not None:
                raise lines.error from None
            raise _training_failure(model_file, lines, exc) from None
        os.replace(prefix + ".vocab", vocab_file)
        os.replace(prefix + ".model", model_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"trained a SentencePiece {model_type} model ({vocab_size} pieces requested) on {lines.count} lines of "
          f"{len(lines.files)} file(s): wrote {model_file} and {vocab_file}", flush=True)


def _train_on_rank_0(model_file: str, train: Callable[[], None]) -> None:
    """``train()`` on global rank 0 when ``model_file`` is absent, the other ranks waiting for it.

    A failure on rank 0 reaches the others as an error instead of a hang; a rank that still cannot
    see the model afterwards (a folder not shared between nodes) says so.
    """

    def build() -> None:
        if not mpu.is_rank_0():
            raise DataError(f"rank 0 has SentencePiece model {model_file} but rank {dist.get_rank()} cannot see "
                            "it; put --tokenizer-path on a filesystem every node shares")
        train()

    once_per_group(lambda: os.path.isfile(model_file), build, what=f"SentencePiece model {model_file}")


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise DataError("SentencePieceTokenizer needs the sentencepiece package: pip install sentencepiece") from None
    return sentencepiece


def _load_sentencepiece(model_file: str) -> Any:
    spm = _sentencepiece()

    try:
        return spm.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"cannot load SentencePiece model {model_file} ({reason}); delete it to train a new one "
                        "from --train-data, or pass another --tokenizer-path") from None


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, trained once on the training corpus when it does not exist yet.

    ``[PAD]``, ``[CLS]``, ``[SEP]`` and ``[MASK]`` are reserved pieces (``pad``, ``cls``, ``sep``,
    ``mask``; ``eod`` is ``sep``) that ``encode`` never produces; ``decode`` drops them.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, tokenizer_path: str = "tokenizer.model", train_files: Sequence[str] | None = None,
                 vocab_size: int | None = None, model_type: str | None = None, text_key: str = "text") -> None:
        self.model_file, self.vocab_file = sentencepiece_files(tokenizer_path)
        files = list(train_files or [])
        _train_on_rank_0(self.model_file, lambda: train_sentencepiece(
            self.model_file, self.vocab_file, files, vocab_size, model_type, text_key))
        self._sp = _load_sentencepiece(self.model_file)
        ids = {tok: self._sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok, i in ids.items() if i == self._sp.unk_id()]
        if missing:
            raise DataError(f"SentencePiece model {self.model_file} lacks the reserved pieces {missing}; delete it "
                            "to train a new one from --train-data, or pass another --tokenizer-path")
        self.pad, self.cls, self.sep, self.mask = (ids[tok] for tok in SPECIAL_TOKENS)
        self._identity = f"{self.name}:{_hash_files(self.model_file)}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sep

    @property
    def identity(self) -> str:
        return self._identity


class CharacterLevelTokenizer(Tokenizer):
    """One id per byte of the UTF-8 text (0..255), then ``[PAD]`` 256, ``[CLS]`` 257, ``[SEP]`` 258, ``[MASK]`` 259."""

    name = "CharacterLevelTokenizer"
    pad, cls, sep, mask = range(256, 256 + len(SPECIAL_TOKENS))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    @property
    def eod(self) -> int:
        return self.sep

    @property
    def identity(self) -> str:
        return f"{self.name}:utf-8-bytes+{'+'.join(SPECIAL_TOKENS)}"


TOKENIZER_TYPES = ("GPT2BPETokenizer", "BertWordPieceTokenizer", "SentencePieceTokenizer", "CharacterLevelTokenizer")


def make_tokenizer(tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None,
                   cache_dir: str | None = None, *, model_type: str | None = None, tokenizer_path: str | None = None,
                   vocab_size: int | None = None, train_files: Sequence[str] | None = None,
                   text_key: str = "text") -> Tokenizer:
    """Build the tokenizer named ``tokenizer_type``; the module docstring says what each one reads.

    ``model_type`` is ``--tokenizer-model-type``; ``tokenizer_path`` (default ``tokenizer.model``),
    ``vocab_size`` (default 30522), ``train_files`` and ``text_key`` only matter to a SentencePiece
    model that has to be trained.
    """
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _find_file(vocab_file, cache_dir, [GPT2_VOCAB_NAME], "vocabulary", tokenizer_type, "--vocab-file")
        merges = _find_file(merge_file, cache_dir, [GPT2_MERGES_NAME], "merges", tokenizer_type, "--merge-file")
        return GPT2BPETokenizer(vocab, merges)
    if tokenizer_type == "BertWordPieceTokenizer" and model_type and os.path.isdir(model_type):
        vocab = _find_file(vocab_file, model_type, ["vocab.txt"], "vocabulary", tokenizer_type, "--vocab-file")
        return BertWordPieceTokenizer(vocab, lower_case=hf_folder_lower_case(model_type))
    if tokenizer_type == "BertWordPieceTokenizer":
        lower_case = bert_lower_case(model_type)
        vocab = _find_file(vocab_file, cache_dir, bert_vocab_names(model_type), "vocabulary", tokenizer_type,
                           "--vocab-file", fetches=f" (it fetches the uncased {BERT_VOCAB_NAME})")
        return BertWordPieceTokenizer(vocab, lower_case=lower_case)
    if tokenizer_type == "SentencePieceTokenizer":
        size = SPM_DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        return SentencePieceTokenizer(tokenizer_path or "tokenizer.model", train_files, size, model_type, text_key)
    if tokenizer_type == "CharacterLevelTokenizer":
        return CharacterLevelTokenizer()
    raise DataError(
        f"unknown tokenizer type {tokenizer_type!r}; known: {', '.join(TOKENIZER_TYPES)} (--tokenizer-type)"
    )
