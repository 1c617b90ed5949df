"""Inputs that live elsewhere: URLs (`https://`, `http://`, `s3://`, `gs://`, `az://`) and GDAL's
virtual file system paths (`/vsicurl/`, `/vsis3/`, `/vsigs/`, `/vsiaz/`, ...). GDAL reads them
window by window with range requests (rasterio hands a URL to the matching `/vsi` handler), so a
cloud-optimised GeoTIFF streams like a local file: only the blocks a tile spans are fetched.

`RemotePath` stands where a local `Path` stands for an input (its name, stem and suffix name the
outputs; `str()` is what the user gave). `REMOTE_GDAL` is what every job reading one runs under: no
directory listing on opening, a block cache, retries on transient errors.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath

SCHEMES = ("http", "https", "s3", "gs", "az", "ftp")
VSI = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs")
HTTP_RETRIES = 4  # transient HTTP errors (429, 502, 503, 504) retried this often, a second apart and more

REMOTE_GDAL = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the "folder" to look for sidecars
    "GDAL_HTTP_MAX_RETRY": str(HTTP_RETRIES),
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",  # a small cache of the bytes fetched, per file
    "VSI_CACHE_SIZE": str(25 * 2 ** 20),
    "CPL_VSIL_CURL_CACHE_SIZE": str(64 * 2 ** 20),
}


def is_remote(text: str | object) -> bool:
    """Whether an input names a URL or a GDAL virtual file system path rather than a local file."""
    s = str(text)
    return bool(re.match(r"^(%s)://" % "|".join(SCHEMES), s, re.I)) or s.startswith(tuple(v + "/" for v in VSI))


class RemotePath:
    """A remote input, named like a file: `name`, `stem` and `suffix` of the URL's path (its query
    string left out); `str()` the URL or /vsi path as given."""

    def __init__(self, text: str):
        self.text = text
        path = re.sub(r"[?#].*$", "", text.split("://", 1)[-1])
        self._path = PurePosixPath(path)

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def stem(self) -> str:
        return self._path.stem

    @property
    def suffix(self) -> str:
        return self._path.suffix

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.text.rsplit("/", 1)[0])

    def exists(self) -> bool:  # known only by opening it: the reader says what is wrong
        return True

    def is_file(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def __str__(self) -> str:
        return self.text

    def __fspath__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"RemotePath({self.text!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)


def input_path(text: str):
    """A `RemotePath` for a URL or /vsi path, else a local `Path` (user folder expanded)."""
    from pathlib import Path

    return RemotePath(text) if is_remote(text) else Path(text).expanduser()


def remote_failure(path: RemotePath, error: Exception) -> str:
    """One line for a remote input GDAL could not open or read, saying what to check."""
    from bigseg.errors import first_line

    reason = first_line(error)
    if "Range downloading not supported" in reason or "range" in reason.lower() and "support" in reason.lower():
        return (f"{path}: the server does not answer range requests, so the file cannot be read window by "
                f"window; download it and pass the local file")
    if re.search(r"\b(403|401)\b|Access Denied|AccessDenied|credentials", reason):
        return f"{path}: access denied ({reason}); check the URL or the credentials (AWS_*, GS_*, AZURE_*)"
    if re.search(r"\b404\b|does not exist|No such file|not recognized", reason):
        return f"{path}: not found or not a raster ({reason})"
    return f"{path}: cannot be read ({reason}; retried {HTTP_RETRIES} times)"
