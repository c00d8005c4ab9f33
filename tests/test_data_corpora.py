"""Corpus aliases set from the environment or a json file; reading loose json, tight json and csv (errors,
byte-order marks, --delim)."""

from __future__ import annotations

import json
import os

import pytest

from data_utils.corpora import known_corpora, read_loose_json, read_texts, resolve_corpus, set_delimiter
from data_utils.errors import DataError
from data_utils.lazy_loader import load_corpus
from tests.helpers import ByteTokenizer


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("MEGATRON_CORPUS"):
            monkeypatch.delenv(key)


def touch(path) -> str:
    path.write_text('{"text": "x"}\n')
    return str(path)


def test_existing_path_is_taken_as_is(tmp_path):
    path = touch(tmp_path / "wikipedia")  # a file wins over the alias of the same name
    assert resolve_corpus(path) == [path]


def test_alias_from_its_own_variable_with_several_files(tmp_path, monkeypatch):
    a, b = touch(tmp_path / "a.json"), touch(tmp_path / "b.json")
    monkeypatch.setenv("MEGATRON_CORPUS_WIKIPEDIA", a + os.pathsep + b)
    assert resolve_corpus("wikipedia") == [a, b]
    assert resolve_corpus("Wikipedia") == [a, b]


def test_alias_from_json_file_relative_paths_and_new_aliases(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    web = touch(tmp_path / "data" / "web.json")
    books = touch(tmp_path / "data" / "books.json")
    config = tmp_path / "corpora.json"
    config.write_text(json.dumps({"webtext": "data/web.json", "my-books": ["data/books.json", web]}))
    monkeypatch.setenv("MEGATRON_CORPORA", str(config))
    assert resolve_corpus("webtext") == [os.path.join(str(tmp_path), "data/web.json")]
    assert [os.path.realpath(p) for p in resolve_corpus("my-books")] == [books, web]
    assert "my-books" in known_corpora()
    other = touch(tmp_path / "other.json")
    monkeypatch.setenv("MEGATRON_CORPUS_WEBTEXT", other)  # the per-alias variable wins
    assert resolve_corpus("webtext") == [other]


def test_shakespeare_defaults_to_the_fetched_file(tmp_path):
    path = touch(tmp_path / "shakespeare.json")
    assert resolve_corpus("shakespeare", cache_dir=str(tmp_path)) == [path]
    with pytest.raises(DataError, match="fetch_sample_data.py"):
        resolve_corpus("shakespeare", cache_dir=str(tmp_path / "empty"))


def test_unknown_alias_lists_known_ones_and_how_to_set_one():
    with pytest.raises(DataError) as err:
        resolve_corpus("bookcorpus2")
    msg = str(err.value)
    assert "known: shakespeare, webtext, wikipedia" in msg
    assert "MEGATRON_CORPUS_BOOKCORPUS2=PATH" in msg and "MEGATRON_CORPORA" in msg


def test_builtin_alias_without_files_and_alias_to_missing_file(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="'webtext' has no files configured; set MEGATRON_CORPUS_WEBTEXT"):
        resolve_corpus("webtext")
    monkeypatch.setenv("MEGATRON_CORPUS_WEBTEXT", str(tmp_path / "gone.json"))
    with pytest.raises(DataError, match="gone.json, which does not exist .set by MEGATRON_CORPUS_WEBTEXT"):
        resolve_corpus("webtext")


def test_bad_corpora_json(tmp_path, monkeypatch):
    config = tmp_path / "corpora.json"
    config.write_text('{"a": "x.json",\n "b": }')
    monkeypatch.setenv("MEGATRON_CORPORA", str(config))
    with pytest.raises(DataError, match=r"corpora.json:2: not valid JSON"):
        resolve_corpus("a")
    config.write_text('{"a": 3}')
    with pytest.raises(DataError, match="alias 'a' must map to a path"):
        resolve_corpus("a")


def test_loose_json_skips_blank_lines(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two", "title": "t"}\n{"body": "three", "text": ""}')
    assert list(read_loose_json(str(path))) == ["one", "two", ""]
    with pytest.raises(DataError, match=r"c.json:1: no key 'title'"):
        list(read_loose_json(str(path), text_key="title"))


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(DataError) as err:
        list(read_loose_json(str(path)))
    assert str(err.value).startswith(f"{path}:3: not valid JSON")


def test_missing_key_names_file_line_key_and_keys_present(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"text": "one"}\n{"title": "t", "body": "two"}\n')
    with pytest.raises(DataError) as err:
        list(read_loose_json(str(path)))
    assert str(err.value) == (f"{path}:2: no key 'text' (keys present: 'title', 'body'); "
                              "pass --text-key with the right key")


def test_non_object_and_non_string_values(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('["text"]\n')
    with pytest.raises(DataError, match=":1: expected a json object, got list"):
        list(read_loose_json(str(path)))
    path.write_text('{"text": ["a"]}\n')
    with pytest.raises(DataError, match=":1: key 'text' holds a list"):
        list(read_loose_json(str(path)))
    with pytest.raises(DataError, match="cannot open corpus"):
        list(read_loose_json(str(tmp_path / "missing.json")))


def test_tight_json_array_is_read_like_loose_json(tmp_path):
    from data_utils.corpora import read_texts

    path = tmp_path / "tight.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two", "id": 2}], indent=2))
    assert list(read_texts(str(path))) == ["one", "two"]
    loose = tmp_path / "loose.json"
    loose.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert list(read_texts(str(loose))) == ["one", "two"]
    path.write_text('[{"text": "one"}, {"title": "two"}]')
    with pytest.raises(DataError, match=r"tight.json: element 2 of the json array has no key 'text'"):
        list(read_texts(str(path)))
    path.write_text('[{"text": "one"}, ')
    with pytest.raises(DataError, match=r"tight.json:1: not valid JSON"):
        list(read_texts(str(path)))


def test_csv_and_tsv_with_header_text_column_and_delimiter(tmp_path):
    from data_utils.corpora import read_texts, set_delimiter

    csv_path = tmp_path / "c.csv"
    csv_path.write_text('id,sentence\n1,"hello, world"\n2,"two\nlines"\n')
    assert list(read_texts(str(csv_path), "sentence")) == ["hello, world", "two\nlines"]
    tsv_path = tmp_path / "c.tsv"
    tsv_path.write_text("id\tsentence\n1\ta, b\n")
    assert list(read_texts(str(tsv_path), "sentence")) == ["a, b"]
    semi = tmp_path / "semi.csv"
    semi.write_text("id;sentence\n1;x,y\n")
    with pytest.raises(DataError, match=r"semi.csv:1: no column 'sentence' in the header .*--delim"):
        list(read_texts(str(semi), "sentence"))
    set_delimiter(";")
    try:
        assert list(read_texts(str(semi), "sentence")) == ["x,y"]
    finally:
        set_delimiter(None)
    short = tmp_path / "short.csv"
    short.write_text("sentence,id\nfine,1\n")
    assert list(read_texts(str(short), "sentence")) == ["fine"]
    short.write_text("id,sentence\n1\n")
    with pytest.raises(DataError, match=r"short.csv:2: the row has fewer fields than the header"):
        list(read_texts(str(short), "sentence"))


def test_eval_text_key_reads_valid_and_test_data_under_their_own_key(tmp_path):
    from data_utils import build_gpt2_datasets
    from tests.helpers import ByteTokenizer, write_jsonl

    train = write_jsonl(tmp_path / "train.json", [f"train document {i}" for i in range(20)])
    valid = tmp_path / "valid.json"
    valid.write_text("".join(json.dumps({"body": f"valid document {i}"}) + "\n" for i in range(5)))
    tok = ByteTokenizer()
    _, ds, _ = build_gpt2_datasets([train], [str(valid)], None, "1", 4, tok, False, None, seed=1,
                                   eval_text_key="body")
    assert tok.decode(ds.docs[0]) == "valid document 0"
    with pytest.raises(DataError, match="no key 'text'"):
        build_gpt2_datasets([train], [str(valid)], None, "1", 4, tok, False, None, seed=1)


# --- corpus files: tight json after whitespace or a byte-order mark, csv details, --delim -----------------------------
# Rules the tests above left open, each found by injecting a bug that they missed.

@pytest.fixture
def default_delimiter():
    """Leave the process-wide ``--delim`` as it was found (None) whatever the test does."""
    yield
    set_delimiter(None)


@pytest.mark.parametrize("prefix", ["\n  \t", "\ufeff", "\ufeff\r\n "])
def test_tight_json_is_recognised_after_whitespace_and_a_byte_order_mark(tmp_path, prefix):
    path = tmp_path / "tight.json"
    path.write_text(prefix + json.dumps([{"text": "one"}, {"text": "two"}], indent=1), encoding="utf-8")
    assert list(read_texts(str(path))) == ["one", "two"]


def test_csv_header_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("\ufefftext,id\nhello,1\n", encoding="utf-8")
    assert list(read_texts(str(path))) == ["hello"]


def test_a_csv_field_longer_than_the_csv_default_limit_is_read_whole(tmp_path):
    long_text = "word " * 40_000  # 200 KB, past csv's 128 KiB default field limit
    path = tmp_path / "long.csv"
    path.write_text(f'id,text\n1,"{long_text}"\n2,short\n', encoding="utf-8")
    assert list(read_texts(str(path))) == [long_text, "short"]


@pytest.mark.parametrize("delim", [";;", "", "\\t"])
def test_set_delimiter_takes_one_character_only(delim, default_delimiter):
    with pytest.raises(DataError, match="--delim .*expected one character"):
        set_delimiter(delim)


def test_the_lazy_cache_of_a_csv_corpus_follows_the_delimiter(tmp_path, default_delimiter):
    # Split by ',' the header is [text, a;text] and the text is 'p'; split by ';' it is [text,a, text] and 'r'.
    path = tmp_path / "both.csv"
    path.write_text("text,a;text\np,q;r\n", encoding="utf-8")
    tok, cache = ByteTokenizer(), str(tmp_path / "cache")
    assert tok.decode(load_corpus(str(path), tok, lazy=True, cache_dir=cache)[0]) == "p"
    set_delimiter(";")
    assert tok.decode(load_corpus(str(path), tok, lazy=True, cache_dir=cache)[0]) == "r"
    set_delimiter(None)
    assert tok.decode(load_corpus(str(path), tok, lazy=True, cache_dir=cache)[0]) == "p"
