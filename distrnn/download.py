"""Fetching published data files: one place that turns a failed download into a one-line error.

Every data set keeps its own URLs and checksums; nothing unverified reaches a cache directory
(callers download into a temporary directory, verify, then move the files in).
"""
import hashlib
import os
import shutil
import urllib.parse
import urllib.request

from distrnn.errors import UsageError

SCHEMES = ("https", "http", "ftp", "file")  # what urllib.request opens


def fetch(url: str, path: str, what: str, hint: str) -> str:
    """Downloads `url` to `path`; on failure a UsageError naming `what` and ending with `hint`."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are all OSErrors
        raise UsageError(f"could not download {what} from {url} ({e}); {hint}") from None
    return path


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
