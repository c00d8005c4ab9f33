"""BERT pretraining TFRecords: exact decoding, framing and CRC errors, sharding, data loaders.

The files are written here in Google BERT's format (``create_pretraining_data.py``): the framing is
checked byte for byte against the ``tfrecord`` package's own writer, and the features carry Google's
names, zero-padded positions and ids, and weight 0.0 on padding predictions.
"""

from __future__ import annotations

import pickle
import struct

import crc32c
import numpy as np
import pytest
import torch
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter

from data_utils.errors import DataError
from data_utils.samplers import DistributedBatchSampler, make_data_loader
from data_utils.tf_dl import TFRecordBertDataset, build_tfrecord_datasets, shard_tfrecord_files
from tests.helpers import frame_record, serialize_example, write_google_bert_tfrecord, write_payloads

S, P = 12, 4  # max_seq_length, max_predictions_per_seq of the files below
CLS, SEP, MASK = 101, 102, 103
KEYS = {"text", "types", "is_random", "mask", "mask_labels", "pad_mask"}


def google_record(tokens_a: list[int], tokens_b: list[int], masked: dict[int, int], is_random: int,
                  seq_length: int = S, max_preds: int = P) -> dict[str, list]:
    """A record as create_pretraining_data.py lays it out: [CLS] A [SEP] B [SEP], zero padding.

    ``masked`` maps a position to its original token id; the input holds [MASK] there.
    """
    ids = [CLS, *tokens_a, SEP, *tokens_b, SEP]
    segments = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
    for pos in masked:
        ids[pos] = MASK
    pad, unused = seq_length - len(ids), max_preds - len(masked)
    return {
        "input_ids": ids + [0] * pad,
        "input_mask": [1] * len(ids) + [0] * pad,
        "segment_ids": segments + [0] * pad,
        "masked_lm_positions": sorted(masked) + [0] * unused,
        "masked_lm_ids": [masked[p] for p in sorted(masked)] + [0] * unused,
        "masked_lm_weights": [1.0] * len(masked) + [0.0] * unused,
        "next_sentence_labels": [is_random],
    }


# Three records and, spelled out by hand, the samples they must decode to.
RECORDS = [
    {  # two of four predictions, B is a random sentence
        "input_ids": [CLS, 7, MASK, 9, SEP, 20, MASK, SEP, 0, 0, 0, 0],
        "input_mask": [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        "segment_ids": [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        "masked_lm_positions": [2, 6, 0, 0],
        "masked_lm_ids": [8, 21, 0, 0],
        "masked_lm_weights": [1.0, 1.0, 0.0, 0.0],
        "next_sentence_labels": [1],
    },
    {  # all four predictions, B is the actual next sentence, no padding
        "input_ids": [CLS, MASK, 31, MASK, SEP, 40, 41, MASK, 43, MASK, 45, SEP],
        "input_mask": [1] * 12,
        "segment_ids": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
        "masked_lm_positions": [1, 3, 7, 9],
        "masked_lm_ids": [30, 32, 42, 44],
        "masked_lm_weights": [1.0, 1.0, 1.0, 1.0],
        "next_sentence_labels": [0],
    },
    {  # position 7 carries an id but weight 0: it is not predicted
        "input_ids": [CLS, 50, MASK, 52, MASK, SEP, 60, 61, SEP, 0, 0, 0],
        "input_mask": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "segment_ids": [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        "masked_lm_positions": [2, 4, 7, 0],
        "masked_lm_ids": [51, 53, 99, 0],
        "masked_lm_weights": [1.0, 1.0, 0.0, 0.0],
        "next_sentence_labels": [1],
    },
]
_ = -1  # mask_labels where nothing is predicted
EXPECTED = [
    {
        "text": [CLS, 7, MASK, 9, SEP, 20, MASK, SEP, 0, 0, 0, 0],
        "types": [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        "is_random": 1,
        "mask": [0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        "mask_labels": [_, _, 8, _, _, _, 21, _, _, _, _, _],
        "pad_mask": [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
    },
    {
        "text": [CLS, MASK, 31, MASK, SEP, 40, 41, MASK, 43, MASK, 45, SEP],
        "types": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
        "is_random": 0,
        "mask": [0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0],
        "mask_labels": [_, 30, _, 32, _, _, _, 42, _, 44, _, _],
        "pad_mask": [0] * 12,
    },
    {
        "text": [CLS, 50, MASK, 52, MASK, SEP, 60, 61, SEP, 0, 0, 0],
        "types": [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        "is_random": 1,
        "mask": [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        "mask_labels": [_, _, 51, _, 53, _, _, _, _, _, _, _],
        "pad_mask": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    },
]


def assert_sample(sample: dict[str, np.ndarray], expected: dict) -> None:
    assert set(sample) == KEYS
    for key in KEYS:
        want = np.array(expected[key], dtype=np.int64)
        assert sample[key].dtype == np.int64, key
        assert sample[key].shape == want.shape, key
        np.testing.assert_array_equal(sample[key], want, err_msg=key)


def generated_records(count: int, first: int) -> list[dict[str, list]]:
    """``count`` distinct Google-layout records; record ``j``'s first token is ``first + j``."""
    out = []
    for j in range(count):
        a, b = [first + j, 200 + j, 300], [400 + j % 3] * (j % 4 + 1)
        out.append(google_record(a, b, {2: 200 + j, len(a) + 2: 400 + j % 3}, is_random=j % 2))
    return out


def raises_data_error(fn, *fragments: str) -> str:
    """Run ``fn``, expect one one-line DataError whose message holds every fragment."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def records_path(tmp_path):
    path = tmp_path / "part-0.tfrecord"
    write_google_bert_tfrecord(path, RECORDS)
    return path


def test_framing_matches_the_tfrecord_writer(tmp_path):
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    path = tmp_path / "writer.tfrecord"
    writer = TFRecordWriter(str(path))
    for record in RECORDS:
        writer.write({k: (v, "float" if k == "masked_lm_weights" else "int") for k, v in record.items()})
    writer.close()
    blob, pos, datas = path.read_bytes(), 0, []
    while pos < len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        datas.append(blob[pos + 12:pos + 12 + length])
        pos += 16 + length
    assert b"".join(frame_record(d) for d in datas) == blob
    dataset = TFRecordBertDataset([path], S, P)
    assert len(dataset) == 3
    for i, expected in enumerate(EXPECTED):
        assert_sample(dataset[i], expected)


def test_every_key_decodes_exactly(records_path):
    dataset = TFRecordBertDataset([str(records_path)], seq_length=S, max_preds_per_seq=P)
    assert len(dataset) == len(RECORDS)
    for i, expected in enumerate(EXPECTED):
        assert_sample(dataset[i], expected)
    assert dataset[1]["is_random"].shape == ()


def test_weight_zero_predictions_are_not_predicted(records_path):
    dataset = TFRecordBertDataset([records_path], S, P)
    third = dataset[2]  # position 7 holds id 99 with weight 0; the padding entries point at position 0
    assert third["mask"][7] == 0 and third["mask_labels"][7] == -1
    assert third["mask"][0] == 0 and third["mask_labels"][0] == -1
    assert int(third["mask"].sum()) == 2
    np.testing.assert_array_equal(np.flatnonzero(third["mask_labels"] >= 0), np.flatnonzero(third["mask"]))


def test_samples_run_through_the_files_in_order(tmp_path):
    first, second = tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"
    write_google_bert_tfrecord(first, RECORDS[:2])
    write_google_bert_tfrecord(second, RECORDS[2:])
    dataset = TFRecordBertDataset([first, second], S, P)
    assert len(dataset) == 3
    for i, expected in enumerate(EXPECTED):
        assert_sample(dataset[i], expected)
    assert_sample(dataset[-1], EXPECTED[2])
    with pytest.raises(IndexError):
        dataset[3]


def test_google_layout_helper_decodes_to_its_masks(tmp_path):
    record = google_record([7, 8, 9], [20, 21], {2: 8, 5: 20}, is_random=0)
    path = tmp_path / "one.tfrecord"
    write_google_bert_tfrecord(path, [record])
    assert_sample(TFRecordBertDataset([path], S, P)[0], {
        "text": [CLS, 7, MASK, 9, SEP, MASK, 21, SEP, 0, 0, 0, 0],
        "types": [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        "is_random": 0,
        "mask": [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        "mask_labels": [_, _, 8, _, _, 20, _, _, _, _, _, _],
        "pad_mask": [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
    })


def test_length_mismatches_name_the_flag(tmp_path, records_path):
    raises_data_error(lambda: TFRecordBertDataset([records_path], 16, P),
                      str(records_path), "record 0", "'input_ids'", "has 12 values", "--seq-length is 16")
    raises_data_error(lambda: TFRecordBertDataset([records_path], S, 5),
                      str(records_path), "record 0", "'masked_lm_positions'", "--max-preds-per-seq")
    short = dict(RECORDS[2], segment_ids=RECORDS[2]["segment_ids"][:-1])  # a bad record after good ones
    path = tmp_path / "short.tfrecord"
    write_google_bert_tfrecord(path, [*RECORDS[:2], short])
    dataset = TFRecordBertDataset([path], S, P)
    assert_sample(dataset[1], EXPECTED[1])
    raises_data_error(lambda: dataset[2], str(path), "record 2", "'segment_ids'", "--seq-length")


def test_truncated_files_are_errors(tmp_path):
    path = tmp_path / "cut.tfrecord"
    offsets = write_google_bert_tfrecord(path, RECORDS)
    blob = path.read_bytes()
    path.write_bytes(blob[:-3])  # the last record loses part of its data CRC
    raises_data_error(lambda: TFRecordBertDataset([path], S, P),
                      str(path), "record 2", f"byte offset {offsets[2]}", "truncated")
    path.write_bytes(blob + blob[:5])  # a fourth record with 5 of its 12 header bytes
    raises_data_error(lambda: TFRecordBertDataset([path], S, P),
                      str(path), "record 3", f"byte offset {len(blob)}", "truncated")


def test_flipped_bytes_fail_their_crc(tmp_path):
    path = tmp_path / "flip.tfrecord"
    offsets = write_google_bert_tfrecord(path, RECORDS)
    blob = bytearray(path.read_bytes())
    blob[offsets[1] + 12 + 20] ^= 0x01  # inside record 1's Example bytes
    path.write_bytes(bytes(blob))
    dataset = TFRecordBertDataset([path], S, P)
    assert_sample(dataset[0], EXPECTED[0])
    raises_data_error(lambda: dataset[1], str(path), "record 1", "CRC")
    assert_sample(dataset[2], EXPECTED[2])
    blob[offsets[1] + 12 + 20] ^= 0x01
    blob[offsets[1]] ^= 0x04  # record 1's length field
    path.write_bytes(bytes(blob))
    raises_data_error(lambda: TFRecordBertDataset([path], S, P), str(path), "record 1", "CRC")


def test_missing_feature_names_file_record_and_feature(tmp_path):
    path = tmp_path / "missing.tfrecord"
    partial = {k: v for k, v in RECORDS[1].items() if k != "masked_lm_weights"}
    write_google_bert_tfrecord(path, [RECORDS[0], partial])
    dataset = TFRecordBertDataset([path], S, P)
    raises_data_error(lambda: dataset[1], str(path), "record 1", "'masked_lm_weights'")


def test_a_non_example_payload_is_an_error(tmp_path):
    path = tmp_path / "json.tfrecord"
    write_payloads(path, [serialize_example(RECORDS[0]), b'{"text": "a json line, not an Example"}'])
    dataset = TFRecordBertDataset([path], S, P)
    raises_data_error(lambda: dataset[1], str(path), "record 1", "not a tf.train.Example")


def _weights_as_int64() -> bytes:
    example = example_pb2.Example.FromString(serialize_example(RECORDS[0]))
    example.features.feature["masked_lm_weights"].int64_list.value.extend([1, 1, 0, 0])
    return example.SerializeToString()


@pytest.mark.parametrize("payload, fragment", [
    (lambda: serialize_example(dict(RECORDS[0], masked_lm_positions=[2, 12, 0, 0])), "masked_lm_positions"),
    (lambda: serialize_example(dict(RECORDS[0], next_sentence_labels=[2])), "next_sentence_labels"),
    (_weights_as_int64, "'masked_lm_weights' has kind int64_list, expected float_list"),
])
def test_bad_feature_values_are_errors(tmp_path, payload, fragment):
    path = tmp_path / "bad.tfrecord"
    write_payloads(path, [payload()])
    raises_data_error(lambda: TFRecordBertDataset([path], S, P), str(path), "record 0", fragment)


def test_missing_empty_and_no_files(tmp_path, records_path):
    missing = tmp_path / "nowhere.tfrecord"
    raises_data_error(lambda: TFRecordBertDataset([records_path, missing], S, P), str(missing), "does not exist")
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    raises_data_error(lambda: TFRecordBertDataset([records_path, empty], S, P), str(empty), "no records")
    raises_data_error(lambda: TFRecordBertDataset([], S, P), "no TFRecord files")


def test_sharding_deals_out_whole_files():
    paths = [f"part-{i}.tfrecord" for i in range(5)]
    assert shard_tfrecord_files(paths, 0, 2) == ["part-0.tfrecord", "part-2.tfrecord", "part-4.tfrecord"]
    assert shard_tfrecord_files(paths, 1, 2) == ["part-1.tfrecord", "part-3.tfrecord"]
    for dp_size in (1, 2, 3, 5):
        shards = [shard_tfrecord_files(paths, r, dp_size) for r in range(dp_size)]
        assert all(shards)
        assert sorted(p for shard in shards for p in shard) == paths  # disjoint and complete
    raises_data_error(lambda: shard_tfrecord_files(paths[:2], 0, 3),
                      "2 TFRecord file(s) for 3 data-parallel ranks", "whole files")
    raises_data_error(lambda: shard_tfrecord_files(paths, 2, 2), "dp_rank=2")


def test_build_shards_training_files_only(tmp_path):
    train = [tmp_path / f"train-{i}.tfrecord" for i in range(3)]
    for i, path in enumerate(train):
        write_google_bert_tfrecord(path, generated_records(i + 1, first=10 * i))
    valid = tmp_path / "valid.tfrecord"
    write_google_bert_tfrecord(valid, RECORDS)
    train_ds, valid_ds, test_ds = build_tfrecord_datasets(train, [valid], None, S, P, dp_rank=1, dp_size=2)
    assert train_ds.rank_sharded and train_ds.paths == [str(train[1])]
    assert [int(train_ds[j]["text"][1]) for j in range(len(train_ds))] == [10, 11]
    assert not valid_ds.rank_sharded and len(valid_ds) == 3  # every rank sees all of valid; the loader splits it
    assert test_ds is None
    assert build_tfrecord_datasets([], None, [], S, P, 0, 1) == (None, None, None)


def test_picklable_for_dataloader_workers(tmp_path):
    paths = [tmp_path / f"part-{i}.tfrecord" for i in range(2)]
    for i, path in enumerate(paths):
        write_google_bert_tfrecord(path, generated_records(6, first=20 * i))
    dataset = TFRecordBertDataset(paths, S, P)
    expected = [dataset[i] for i in range(len(dataset))]  # leaves files open in this process
    clone = pickle.loads(pickle.dumps(dataset))
    for i in (0, 7, 11):
        assert_sample(clone[i], expected[i])
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == 4
    for key in KEYS:
        got = torch.cat([b[key] for b in batches])
        want = torch.from_numpy(np.stack([e[key] for e in expected]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_make_data_loader_shuffles_this_ranks_records(tmp_path):
    path = tmp_path / "part-0.tfrecord"
    write_google_bert_tfrecord(path, generated_records(10, first=1))
    dataset = TFRecordBertDataset([path], S, P, rank_sharded=True)
    batches = make_data_loader(dataset, batch_size=4, dp_rank=0, dp_size=1, seed=5, num_workers=2)
    reference = DistributedBatchSampler(len(dataset), 4, 0, 1, seed=5)
    seen = []
    for step in range(3):  # the third batch straddles epochs 0 and 1
        batch = next(batches)
        indices = reference.global_batch(4 * step).tolist()
        seen += indices
        for key in KEYS:
            want = torch.from_numpy(np.stack([dataset[i][key] for i in indices]))
            torch.testing.assert_close(batch[key], want, rtol=0, atol=0)
    assert sorted(seen[:10]) == list(range(10)) and seen[:10] != list(range(10))
    assert batches.state_dict() == {"consumed_samples": 12}
