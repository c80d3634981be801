"""Fetching published data files: one place that turns a failed download into a one-line error.

Every data set keeps its own URLs and checksums; `into_cache` is the one way files reach a cache
directory: downloaded into a temporary directory beside it, verified, then moved in.
"""
import hashlib
import os
import tempfile
import threading
import urllib.parse
import urllib.request
from typing import Callable, Sequence

from distrnn.errors import SaveFailed, UsageError
from distrnn.run import files

SCHEMES = ("https", "http", "ftp", "file")  # what urllib.request opens


def fetch(url: str, path: str, what: str, hint: str) -> str:
    """Downloads `url` to `path`; on failure a UsageError naming `what` and ending with `hint`.

    The transfer runs in a thread while the main thread waits in short joins: a signal sent to the
    process may be delivered to any of its threads (TensorFlow starts many), and CPython then only sets
    a flag that the main thread acts on when it next runs Python code, which a main thread blocked in a
    read would not do until the read returned (a stalled mirror: up to the 60 s timeout). Joining in steps
    of 0.2 s, it acts on Ctrl-C or SIGTERM within that."""
    failure = []

    def transfer(out):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as e:  # this machine's disk, not the network
                        raise _LocalWrite(e) from None
        except BaseException as e:  # handed to the main thread
            failure.append(e)

    try:
        # Opened here, not in the thread: once the main thread has gone (a signal), the thread makes no file.
        with open(path, "wb") as out:
            worker = threading.Thread(target=transfer, args=(out,), name="distrnn-download", daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.2)
    except OSError as e:
        failure.append(_LocalWrite(e))
    if failure and isinstance(failure[0], _LocalWrite):
        raise files.save_failed(path, failure[0].error, f"the download of {what} to {path}") from None
    if failure and isinstance(failure[0], (OSError, ValueError)):  # URLError, timeouts, refused connections
        raise UsageError(f"could not download {what} from {url} ({failure[0]}); {hint}") from None
    if failure:
        raise failure[0]
    return path


class _LocalWrite(Exception):
    """An OSError of the file a download goes to (a full disk), apart from the network's."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


def hexdigest(data: bytes, algorithm: str) -> str:
    """md5, sha1 or sha256 of `data`."""
    return hashlib.new(algorithm, data).hexdigest()


def mirror_url(environment_variable: str, default: str) -> str:
    """A mirror named in the environment (checked to be a URL urllib can fetch), or the published place."""
    url = os.environ.get(environment_variable, "").strip()
    if not url:
        return default
    if urllib.parse.urlsplit(url).scheme not in SCHEMES:
        raise UsageError(f"{environment_variable}={url!r} is not a URL: give one starting with "
                         f"{', '.join(s + '://' for s in SCHEMES)}, or unset it for the published place")
    return url


def into_cache(directory: str, names: Sequence[str], fill: Callable[[str], None],
               verify: Callable[[str], None], hint: str = "") -> str:
    """Fills `directory` with the files `names`: fill(tmp) writes them into a temporary directory inside
    it, verify(tmp) checks them, and only then are they moved in (os.replace: a reader never sees half
    a file, an interrupted download leaves nothing). A cache that cannot be written (a read-only home, a
    full disk) is SaveFailed, saying `hint` (the flag that names data already on disk)."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            fill(tmp)
            verify(tmp)
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    except OSError as e:
        raise SaveFailed(f"could not write the data cache {directory} ({files.os_reason(e)}); make it writable, or "
                         f"{hint or 'pass --data_path DIR with the files'}") from None
    return directory


def cached(directory: str, names: Sequence[str], fill: Callable[[str], str], verify: Callable[[str], None]) -> str:
    """The default cache of a data set: downloaded (fill(directory)) when a file is missing, then verified."""
    if not all(os.path.exists(os.path.join(directory, name)) for name in names):
        fill(directory)
    verify(directory)
    return directory
