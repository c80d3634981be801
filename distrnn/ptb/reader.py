"""Penn Treebank reader: the standard three files, the vocabulary, and batching.

Files are `ptb.train.txt`, `ptb.valid.txt` and `ptb.test.txt`, one sentence a
line; every line ends with the token `<eos>`. The vocabulary is built from
train, most frequent word first (ties broken alphabetically, as the reference).
Words of valid/test missing from it become `<unk>` and are counted.
"""
import collections
import dataclasses
import os
import tarfile
from typing import Dict, Iterator, Tuple

import numpy as np

from distrnn.download import cached, fetch, hexdigest, into_cache, mirror_url
from distrnn.errors import UsageError
from distrnn.run import files
from distrnn.run.files import write_text

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
# The standard files as published in Mikolov's simple-examples archive. ptb.train.txt
# is known in public copies by its git blob id: sha1(b"blob <size>\0" + bytes).
CHECKSUMS = {
    "ptb.train.txt": ("git-blob-sha1", "04d78dc94771b5c04adc40b3be08bd8c82942e7f"),
    "ptb.valid.txt": ("sha256", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "ptb.test.txt": ("sha256", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}
DATA_PATH_HINT = ("pass --data_path DIR, where DIR holds ptb.train.txt, ptb.valid.txt and ptb.test.txt "
                  "(from simple-examples.tgz: simple-examples/data/)")


def file_name(split: str) -> str:
    return f"ptb.{split}.txt"


def digest(path: str, kind: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read data file {path} ({e.strerror}); delete {os.path.dirname(path)} to download "
                         f"again, or {DATA_PATH_HINT}") from None
    if kind == "sha256":
        return hexdigest(data, "sha256")
    return hexdigest(b"blob %d\0" % len(data) + data, "sha1")


def verify(directory: str) -> None:
    """Checks the standard files in `directory` against their published checksums."""
    for name, (kind, expected) in CHECKSUMS.items():
        path = os.path.join(directory, name)
        actual = digest(path, kind)
        if actual != expected:
            raise UsageError(f"{path} does not match the standard PTB file ({kind} {actual}, expected "
                             f"{expected}); delete {directory} to download again, or {DATA_PATH_HINT}")


def download(directory: str, url: str = None) -> str:
    """Downloads and extracts the three standard files into `directory`, verified.

    The archive comes from ARCHIVE_URL, or from $DISTRNN_PTB_URL (a mirror) when set.
    """
    url = url or mirror_url("DISTRNN_PTB_URL", ARCHIVE_URL)

    def extract(tmp):
        archive = fetch(url, os.path.join(tmp, "simple-examples.tgz"), "PTB", DATA_PATH_HINT)
        try:
            with tarfile.open(archive) as tar:
                for name in CHECKSUMS:
                    member = tar.getmember(f"./simple-examples/data/{name}")
                    if not member.isfile():
                        raise tarfile.TarError(f"its {member.name} is not a file")
                    with tar.extractfile(member) as src:
                        files.copy_stream(src, os.path.join(tmp, name))
        except tarfile.ReadError:
            raise UsageError(f"{url} is not a tar archive; point DISTRNN_PTB_URL at simple-examples.tgz, or "
                             f"{DATA_PATH_HINT}") from None
        except (tarfile.TarError, KeyError, EOFError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{url} is not the simple-examples archive ({first}); {DATA_PATH_HINT}") from None

    return into_cache(directory, CHECKSUMS, extract, verify, DATA_PATH_HINT)


def default_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "distrnn", "ptb")


def resolve_data_path(data_path: str = None) -> str:
    """A user's --data_path is read as it is; the default cache is downloaded and verified."""
    return data_path or cached(default_dir(), CHECKSUMS, download, verify)


def read_words(path: str, hint: str = DATA_PATH_HINT):
    """The words of a file, with `<eos>` at the end of every line; a file that cannot be read is a UsageError
    naming it and ending with `hint`."""
    if os.path.isdir(path):
        raise UsageError(f"data file {path} is a directory, not a file; {hint}")
    if not os.path.isfile(path):
        raise UsageError(f"missing data file {path}; {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            words = f.read().replace("\n", f" {EOS} ").split()
    except OSError as e:
        raise UsageError(f"cannot read data file {path} ({e.strerror}); make it readable or {hint}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                         f"the PTB files are plain text; {hint}") from None
    if all(w == EOS for w in words):  # nothing but blank lines counts as empty
        raise UsageError(f"data file {path} is empty; {hint}")
    return words


def build_vocab(words) -> Dict[str, int]:
    """Word -> id, most frequent first; `<unk>` is always present."""
    counts = collections.Counter(words)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = {word: i for i, (word, _) in enumerate(ordered)}
    vocab.setdefault(UNK, len(vocab))
    return vocab


def to_ids(words, vocab: Dict[str, int]) -> Tuple[np.ndarray, int]:
    """Ids of `words`, and how many were outside the vocabulary (mapped to <unk>)."""
    unk = vocab[UNK]
    ids = np.fromiter((vocab.get(w, unk) for w in words), dtype=np.int32, count=len(words))
    oov = sum(1 for w in words if w not in vocab)
    return ids, oov


@dataclasses.dataclass
class PTBData:
    vocab: Dict[str, int]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    oov: Dict[str, int]  # words of valid/test mapped to <unk>

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def describe(self) -> str:
        return (f"vocabulary {self.vocab_size}, words train {len(self.train)} valid {len(self.valid)} test "
                f"{len(self.test)}; words mapped to <unk>: valid {self.oov['valid']}, test {self.oov['test']}")


VOCAB_FILE = "vocab.txt"  # in a run's save path: one word a line, in id order


def save_vocab(save_path: str, vocab: Dict[str, int]) -> None:
    """Writes SAVE_PATH/vocab.txt (atomically, and only where it would change: a resumed run on a full
    disk still starts), so that a trained model can be used without the training data."""
    text = "".join(f"{word}\n" for word, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    path = os.path.join(save_path, VOCAB_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)


def read_vocab(save_path: str, vocab_size: int) -> Dict[str, int]:
    """The vocabulary a run saved, checked against the size its model was built for."""
    path = os.path.join(save_path, VOCAB_FILE)
    rebuild = "pass --data_path DIR, the data the run trained on, to rebuild it"
    try:
        with open(path, encoding="utf-8") as f:
            words = f.read().split("\n")
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; {rebuild}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not the run's vocabulary; {rebuild}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); make it readable") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"{rebuild}") from None
    words = words[:-1] if words and words[-1] == "" else words
    vocab = {word: i for i, word in enumerate(words)}
    problem = (f"it has {len(words)} words, the model {vocab_size}" if len(words) != vocab_size else
               "a word appears twice" if len(vocab) != len(words) else
               "a line is empty or holds a space" if any(not w or w.split() != [w] for w in words) else
               f"it lacks {UNK} or {EOS}" if UNK not in vocab or EOS not in vocab else None)
    if problem:
        raise UsageError(f"{path} is not this run's vocabulary ({problem}); {rebuild}")
    return vocab


def load(data_path: str) -> PTBData:
    words = {split: read_words(os.path.join(data_path, file_name(split))) for split in SPLITS}
    vocab = build_vocab(words["train"])
    ids, oov = {}, {}
    for split in SPLITS:
        ids[split], oov[split] = to_ids(words[split], vocab)
    return PTBData(vocab, ids["train"], ids["valid"], ids["test"], {"valid": oov["valid"], "test": oov["test"]})


# Truncated backprop through time. The token stream is cut into batch_size
# rows; row r continues where row r-1's text left off, and each step trains on
# the next window of num_steps columns, carrying the LSTM state across windows:
#
#   stream  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11      batch_size=3, num_steps=2
#   rows    [t0 t1 t2 t3]                              window 0: x=rows[:, 0:2]
#           [t4 t5 t6 t7]                                        y=rows[:, 1:3]
#           [t8 t9 t10 t11]                            window 1: x=rows[:, 2:4] ...
#
# Training drops the tail of the stream that does not fill a row and the last
# partial window, as the reference does; evaluation counts every token.

def train_rows(data: np.ndarray, batch_size: int) -> np.ndarray:
    """The stream cut into batch_size rows: (batch_size, batch_len)."""
    batch_len = len(data) // batch_size
    return data[:batch_size * batch_len].reshape(batch_size, batch_len)


def epoch_size(num_tokens: int, batch_size: int, num_steps: int) -> int:
    """Training windows per epoch."""
    return (num_tokens // batch_size - 1) // num_steps


def train_windows(rows: np.ndarray, num_steps: int, start: int = 0) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """Yields (index, x, y) for the windows of `rows` from window `start`; x, y: (batch, num_steps)."""
    for i in range(start, (rows.shape[1] - 1) // num_steps):
        yield (i, *train_window(rows, num_steps, i))


def train_window(rows: np.ndarray, num_steps: int, i: int) -> Tuple[np.ndarray, np.ndarray]:
    """Window i of `rows`: x, the inputs, and y, the same words one later: (batch, num_steps) each."""
    lo = i * num_steps
    return rows[:, lo:lo + num_steps], rows[:, lo + 1:lo + num_steps + 1]


@dataclasses.dataclass
class EvalBatches:
    """A split laid out for exact evaluation: every token is a target once.

    The stream gets a leading `<eos>` (the end of the sentence before it), so
    its first word is predicted too. Targets are cut into `batch_size` rows of
    equal length; the last row and the last window are padded, and `weights`
    is 0 on padding, so sum(weights) == number of words in the split.
    """
    inputs: np.ndarray   # (batch_size, windows * num_steps) int32
    targets: np.ndarray  # same shape
    weights: np.ndarray  # same shape, float32: 1 on real targets, 0 on padding
    num_steps: int

    @property
    def num_windows(self) -> int:
        return self.inputs.shape[1] // self.num_steps

    def window(self, i: int):
        s = slice(i * self.num_steps, (i + 1) * self.num_steps)
        return self.inputs[:, s], self.targets[:, s], self.weights[:, s]


def eval_batches(data: np.ndarray, eos_id: int, batch_size: int, num_steps: int) -> EvalBatches:
    n = len(data)
    stream = np.concatenate([[eos_id], data]).astype(np.int32)
    row_len = -(-n // batch_size)                       # ceil(n / batch_size)
    padded_len = -(-row_len // num_steps) * num_steps   # whole windows
    inputs = np.zeros((batch_size, padded_len), np.int32)
    targets = np.zeros((batch_size, padded_len), np.int32)
    weights = np.zeros((batch_size, padded_len), np.float32)
    for r in range(batch_size):
        lo, hi = r * row_len, min((r + 1) * row_len, n)
        if lo >= hi:
            continue
        inputs[r, :hi - lo] = stream[lo:hi]
        targets[r, :hi - lo] = stream[lo + 1:hi + 1]
        weights[r, :hi - lo] = 1.0
    return EvalBatches(inputs, targets, weights, num_steps)


@dataclasses.dataclass(frozen=True)
class RankBatches:
    """The data as one rank of a job trains and evaluates on it: its rows of every split laid out for
    the global batch (rank r holds rows r*B ... r*B+B-1, see World.stripe)."""
    train_rows: np.ndarray   # (B, batch_len)
    valid: EvalBatches
    test: EvalBatches
    steps_per_epoch: int     # training windows an epoch (the same on every rank)


def rank_batches(data: PTBData, global_batch: int, num_steps: int, world, batch_text: str) -> RankBatches:
    """batch_text: the batch as the user asked for it, for the error when the data is too short."""
    steps = epoch_size(len(data.train), global_batch, num_steps)
    if steps < 1:
        raise UsageError(f"the train split has {len(data.train)} words, too few for {batch_text} (it needs more "
                         f"than {global_batch * (num_steps + 1)}); lower --batch_size or --num_steps")

    def share(batches: EvalBatches) -> EvalBatches:
        return EvalBatches(world.stripe(batches.inputs), world.stripe(batches.targets), world.stripe(batches.weights),
                           batches.num_steps)

    eos = data.vocab[EOS]
    return RankBatches(world.stripe(train_rows(data.train, global_batch)),
                       share(eval_batches(data.valid, eos, global_batch, num_steps)),
                       share(eval_batches(data.test, eos, global_batch, num_steps)), steps)
