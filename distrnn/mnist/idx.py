"""MNIST and Fashion-MNIST: the IDX files, read and checked, and where they come from.

Both data sets ship as four gzipped IDX files (LeCun's format): a 4-byte magic
number (0, 0, type 0x08 = unsigned byte, number of dimensions), each dimension
as a big-endian uint32, then the bytes in C order:

    train-images-idx3-ubyte.gz   magic 0x00000803, N x rows x cols pixels (0..255)
    train-labels-idx1-ubyte.gz   magic 0x00000801, N labels (0..9)
    t10k-images-idx3-ubyte.gz    the same for the test split
    t10k-labels-idx1-ubyte.gz

A file that is not gzip, has the wrong magic number, is truncated or longer
than its header says, or whose labels do not match its images in number is
refused with one line naming the file and the problem.
"""
import dataclasses
import gzip
import math
import os
import struct
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from distrnn import download, names
from distrnn.errors import UsageError

NUM_CLASSES = 10
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FILE_NAMES = tuple(name for pair in FILES.values() for name in pair)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A published IDX data set: where it is downloaded from and how its files are recognised."""
    name: str            # --dataset value and cache directory name
    title: str
    url: str             # directory holding the four .gz files
    url_variable: str    # environment variable naming a mirror of that directory
    classes: Tuple[str, ...]
    # Digests of the .gz files as the publisher lists them, and of the decompressed IDX bytes where
    # known: a repack (another gzip of the same bytes) is recognised by the latter.
    gz_digests: Dict[str, Tuple[str, str]]
    idx_sha256: Dict[str, str] = dataclasses.field(default_factory=dict)

    def default_dir(self) -> str:
        return os.path.join(os.path.expanduser("~"), ".cache", "distrnn", self.name)


DATASETS = {
    # The mirror TensorFlow and tensorflow-datasets download MNIST from; sha256 of its .gz files.
    "mnist": Dataset(
        "mnist", "MNIST", "https://storage.googleapis.com/cvdf-datasets/mnist", "DISTRNN_MNIST_URL",
        tuple(str(d) for d in range(10)),
        {"train-images-idx3-ubyte.gz": ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
         "train-labels-idx1-ubyte.gz": ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
         "t10k-images-idx3-ubyte.gz": ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
         "t10k-labels-idx1-ubyte.gz": ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")}),
    # Zalando's repository; md5 of the .gz files as its README lists them. The IDX sha256 were taken from
    # Debian's dataset-fashion-mnist package, whose .gz files are another compression of the same bytes.
    "fashion_mnist": Dataset(
        "fashion_mnist", "Fashion-MNIST",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        "DISTRNN_FASHION_MNIST_URL",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        {"train-images-idx3-ubyte.gz": ("md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
         "train-labels-idx1-ubyte.gz": ("md5", "25c81989df183df01b3e8a0aad5dffbe"),
         "t10k-images-idx3-ubyte.gz": ("md5", "bef4ecab320f06d8554ea6380940ec79"),
         "t10k-labels-idx1-ubyte.gz": ("md5", "bb300cfdad3c16e7a12a480ee83cd310")},
        {"train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
         "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"}),
}
if tuple(DATASETS) != names.DATASETS:  # the command line offers names.DATASETS without loading this module
    raise ImportError("distrnn.names.DATASETS does not list the data sets of distrnn.mnist.idx")
DATA_PATH_HINT = "pass --data_path DIR, where DIR holds " + ", ".join(FILE_NAMES)


def read_bytes(path: str) -> Tuple[bytes, bytes]:
    """(the file as stored, its decompressed content)."""
    if os.path.isdir(path):
        raise UsageError(f"data file {path} is a directory, not a file; {DATA_PATH_HINT}")
    if not os.path.isfile(path):
        raise UsageError(f"missing data file {path}; {DATA_PATH_HINT}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read data file {path} ({e.strerror}); make it readable or {DATA_PATH_HINT}") from None
    try:
        return raw, gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a truncated stream an EOFError
        raise UsageError(f"{path} is not a complete gzip file ({e}); download it again or {DATA_PATH_HINT}") from None


def parse(path: str, data: bytes, magic: int) -> np.ndarray:
    """The array an IDX file holds, checked against its header."""
    def bad(problem):
        return UsageError(f"{path} is not an IDX file of {'images' if magic == IMAGES_MAGIC else 'labels'}: "
                          f"{problem}; download it again or {DATA_PATH_HINT}")

    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise bad(f"{len(data)} bytes, shorter than its {header}-byte header")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise bad(f"magic number 0x{found:08x}, expected 0x{magic:08x}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if 0 in shape:
        raise bad(f"its header gives the shape {shape}")
    expected = header + math.prod(shape)  # Python's integers: np.prod would wrap around at 2**63
    if len(data) != expected:
        raise bad(f"{len(data)} bytes where its header ({' x '.join(map(str, shape))}) needs {expected}: "
                  f"{'truncated' if len(data) < expected else 'trailing bytes'}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


@dataclasses.dataclass
class Split:
    images: np.ndarray   # (N, rows, cols) uint8
    labels: np.ndarray   # (N,) uint8


def read_split(directory: str, split: str, contents: Dict[str, bytes]) -> Split:
    """A split from the decompressed `contents` of its two files."""
    images_name, labels_name = FILES[split]
    images_path, labels_path = (os.path.join(directory, n) for n in (images_name, labels_name))
    images = parse(images_path, contents[images_name], IMAGES_MAGIC)
    labels = parse(labels_path, contents[labels_name], LABELS_MAGIC)
    if len(images) != len(labels):
        raise UsageError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
                         f"the two must come from the same split ({DATA_PATH_HINT})")
    if labels.max() >= NUM_CLASSES:
        raise UsageError(f"{labels_path} has label {labels.max()}; labels must be 0..{NUM_CLASSES - 1}")
    return Split(images, labels)


@dataclasses.dataclass
class ImageData:
    train: Split
    test: Split
    dataset: Optional[Dataset]  # the published data set the files are, if they are one

    @property
    def image_shape(self) -> Tuple[int, int]:
        return self.train.images.shape[1:]

    @property
    def classes(self) -> Tuple[str, ...]:
        return self.dataset.classes if self.dataset else tuple(str(c) for c in range(NUM_CLASSES))


def load(directory: str) -> ImageData:
    files = {name: read_bytes(os.path.join(directory, name)) for name in FILE_NAMES}
    contents = {name: content for name, (_, content) in files.items()}
    train, test = read_split(directory, "train", contents), read_split(directory, "test", contents)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UsageError(f"train images in {directory} are {'x'.join(map(str, train.images.shape[1:]))} but test "
                         f"images {'x'.join(map(str, test.images.shape[1:]))}; both splits need one image size")
    return ImageData(train, test, identify(files))


def matches(dataset: Dataset, name: str, raw: bytes, content: bytes) -> bool:
    algorithm, expected = dataset.gz_digests[name]
    if download.hexdigest(raw, algorithm) == expected:
        return True
    return name in dataset.idx_sha256 and download.hexdigest(content, "sha256") == dataset.idx_sha256[name]


def identify(files: Dict[str, Tuple[bytes, bytes]]) -> Optional[Dataset]:
    """The published data set whose four files these are ({name: (stored, decompressed)}), or None."""
    for dataset in DATASETS.values():
        if all(matches(dataset, name, *files[name]) for name in FILE_NAMES):
            return dataset
    return None


def verify(directory: str, dataset: Dataset) -> None:
    for name in FILE_NAMES:
        path = os.path.join(directory, name)
        if not matches(dataset, name, *read_bytes(path)):
            raise UsageError(f"{path} is not the published {dataset.title} file (its checksum differs); delete "
                             f"{directory} to download it again, or {DATA_PATH_HINT}")


def fetch(directory: str, dataset: Dataset) -> str:
    """Downloads the four files of `dataset` into `directory`, verified (from $url_variable when set)."""
    base = download.mirror_url(dataset.url_variable, dataset.url).rstrip("/")

    def fill(tmp):
        for name in FILE_NAMES:
            download.fetch(f"{base}/{name}", os.path.join(tmp, name), dataset.title,
                           f"{DATA_PATH_HINT} (or set {dataset.url_variable} to a mirror)")

    return download.into_cache(directory, FILE_NAMES, fill, lambda tmp: verify(tmp, dataset), DATA_PATH_HINT)


def resolve_data_path(data_path: Optional[str], dataset: str) -> str:
    """A user's --data_path is read as it is; the default cache of `dataset` is downloaded and verified."""
    chosen = DATASETS[dataset]
    return data_path or download.cached(chosen.default_dir(), FILE_NAMES, lambda directory: fetch(directory, chosen),
                                        lambda directory: verify(directory, chosen))
