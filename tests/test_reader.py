import hashlib
import json
import os

import numpy as np
import pytest

from conftest import assert_one_line, run_ptb
from distrnn.errors import UsageError
from distrnn.ptb import reader


def test_train_windows_exact():
    # The sequence of TensorFlow 1's reader_test: 15 tokens, 3 rows, windows of 2.
    raw = np.array([4, 3, 2, 1, 0, 5, 6, 1, 1, 1, 1, 0, 3, 4, 1], np.int32)
    rows = reader.train_rows(raw, batch_size=3)
    np.testing.assert_array_equal(rows, [[4, 3, 2, 1, 0], [5, 6, 1, 1, 1], [1, 0, 3, 4, 1]])
    assert reader.epoch_size(len(raw), 3, 2) == 2
    windows = list(reader.train_windows(rows, num_steps=2))
    assert [i for i, _, _ in windows] == [0, 1]
    np.testing.assert_array_equal(windows[0][1], [[4, 3], [5, 6], [1, 0]])
    np.testing.assert_array_equal(windows[0][2], [[3, 2], [6, 1], [0, 3]])
    np.testing.assert_array_equal(windows[1][1], [[2, 1], [1, 1], [3, 4]])
    np.testing.assert_array_equal(windows[1][2], [[1, 0], [1, 1], [4, 1]])
    # Resuming at window 1 yields exactly the rest.
    (i, x, y), = list(reader.train_windows(rows, num_steps=2, start=1))
    assert i == 1
    np.testing.assert_array_equal(x, windows[1][1])


def test_eval_batches_count_every_word_once():
    data = np.arange(1, 12, dtype=np.int32)  # 11 words
    b = reader.eval_batches(data, eos_id=0, batch_size=3, num_steps=2)
    # Leading <eos> (0) so the first word is a target; 11 targets in rows of 4, padded to 2 windows of 2.
    np.testing.assert_array_equal(b.inputs, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]])
    np.testing.assert_array_equal(b.targets, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]])
    np.testing.assert_array_equal(b.weights, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert b.num_windows == 2
    x, y, w = b.window(1)
    np.testing.assert_array_equal(x, [[2, 3], [6, 7], [10, 0]])
    targets = b.targets[b.weights == 1]
    np.testing.assert_array_equal(np.sort(targets), data)


def test_eval_batches_more_rows_than_words():
    b = reader.eval_batches(np.array([7, 8], np.int32), eos_id=0, batch_size=4, num_steps=3)
    assert b.weights.sum() == 2
    np.testing.assert_array_equal(b.targets[b.weights == 1], [7, 8])


def test_vocab_by_frequency_and_unk(tmp_path):
    for split, text in (("train", "b a a\nc a b\n"), ("valid", "a z\n"), ("test", "q q b\n")):
        (tmp_path / f"ptb.{split}.txt").write_text(text)
    data = reader.load(str(tmp_path))
    # counts: a 3, <eos> 2, b 2, c 1; ties alphabetical; <unk> appended because train lacks it.
    assert data.vocab == {"a": 0, "<eos>": 1, "b": 2, "c": 3, "<unk>": 4}
    np.testing.assert_array_equal(data.valid, [0, 4, 1])
    np.testing.assert_array_equal(data.test, [4, 4, 2, 1])
    assert data.oov == {"valid": 1, "test": 2}


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UsageError, match="missing data file .*ptb.train.txt.*--data_path"):
        reader.load(str(tmp_path))
    for split in reader.SPLITS:
        (tmp_path / f"ptb.{split}.txt").write_text("a b\n")
    (tmp_path / "ptb.valid.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="ptb.valid.txt is empty"):
        reader.load(str(tmp_path))


def test_git_blob_digest(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    # `git hash-object` of "hello\n"
    assert reader.digest(str(path), "git-blob-sha1") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert reader.digest(str(path), "sha256") == hashlib.sha256(b"hello\n").hexdigest()


def test_verify_rejects_wrong_files(tmp_path):
    for name in reader.CHECKSUMS:
        (tmp_path / name).write_text("not ptb\n")
    with pytest.raises(UsageError, match="does not match the standard PTB file"):
        reader.verify(str(tmp_path))


def test_shared_ptb_mini_test_file_is_the_standard_one(ptb_mini):
    # ptb-mini's train split is the standard ptb.test.txt, so the published checksum must match it.
    kind, expected = reader.CHECKSUMS["ptb.test.txt"]
    assert reader.digest(os.path.join(ptb_mini, "ptb.train.txt"), kind) == expected


def test_download_unreachable_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="could not download PTB .*--data_path"):
        reader.download(str(tmp_path / "cache"), url="http://127.0.0.1:9/simple-examples.tgz")


def test_download_extracts_and_verifies(tmp_path, monkeypatch):
    # A local archive with the layout of simple-examples.tgz but other contents: rejected, nothing kept.
    import tarfile
    src = tmp_path / "src" / "simple-examples" / "data"
    src.mkdir(parents=True)
    for name in reader.CHECKSUMS:
        (src / name).write_text("a b\n")
    archive = tmp_path / "simple-examples.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "simple-examples", arcname="./simple-examples")
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="does not match the standard PTB file"):
        reader.download(str(cache), url=archive.as_uri())
    assert not any(p.name.startswith("ptb.") for p in cache.iterdir())
    # With the checksums of these files it is accepted and extracted.
    sums = {name: ("sha256", hashlib.sha256(b"a b\n").hexdigest()) for name in reader.CHECKSUMS}
    monkeypatch.setattr(reader, "CHECKSUMS", sums)
    reader.download(str(cache), url=archive.as_uri())
    assert (cache / "ptb.train.txt").read_text() == "a b\n"


def simple_examples(directory, source, corrupt: bool = False):
    """An archive laid out as simple-examples.tgz, holding the files of `source` (one byte changed in the
    training file with corrupt)."""
    import tarfile
    data = directory / "simple-examples" / "data"
    data.mkdir(parents=True)
    for name in reader.CHECKSUMS:
        content = open(os.path.join(source, name), "rb").read()
        (data / name).write_bytes(content.replace(b" the ", b" teh ", 1) if corrupt and "train" in name else content)
    archive = directory / "simple-examples.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory / "simple-examples", arcname="./simple-examples")
    return archive


def test_the_default_download_fills_the_cache_with_the_real_files_and_trains(full_ptb, tmp_path):
    """DISTRNN_PTB_URL pointing at a file:// copy of the real archive: the cache fills, the published
    checksums hold, a job trains on it; a corrupted copy is refused before anything reaches the cache."""
    home = tmp_path / "home"
    cache = home / ".cache" / "distrnn" / "ptb"
    bad = simple_examples(tmp_path / "bad", full_ptb, corrupt=True)
    env = {"HOME": str(home), "DISTRNN_PTB_URL": bad.as_uri()}
    proc = run_ptb("--config", "test", "--max_steps", "2", "--save_path", tmp_path / "r0", env=env)
    assert_one_line(proc, "distrnn.ptb", 2, "ptb.train.txt does not match the standard PTB file")
    assert not any(p.name.startswith("ptb.") for p in cache.iterdir())
    good = simple_examples(tmp_path / "good", full_ptb)
    env["DISTRNN_PTB_URL"] = good.as_uri()
    metrics = tmp_path / "m.json"
    run_ptb("--config", "test", "--max_steps", "2", "--save_path", tmp_path / "r1", "--metrics_json", metrics,
            env=env, check=0)
    for name, (kind, expected) in reader.CHECKSUMS.items():
        assert reader.digest(str(cache / name), kind) == expected
    m = json.loads(metrics.read_text())
    assert m["vocab_size"] == 10000 and m["words"] == {"train": 929589, "valid": 73760, "test": 82430}
