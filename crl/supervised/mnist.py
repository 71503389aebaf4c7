"""MNIST from the four standard IDX gzip files, with a verified download where a network exists.

Why a loader of our own: there is no CPU torchvision build here, and a benchmark must never run
on silently partial data, so every file is checked structurally (gzip stream intact, IDX magic,
payload size equal to the header's dimensions, image count equal to label count, labels 0..9).
Downloads are checked against the official MD5 checksums, written to a temporary file and moved
into place with ``os.replace``, so an interrupted download never leaves a partial file behind.

Format reference: Y. LeCun, C. Cortes, C. Burges, "The MNIST database of handwritten digits"
(IDX file format description).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

#: dataset key -> standard file name.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: MD5 of the official files (the same files every public mirror serves).
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: Public mirrors, tried in order (yann.lecun.com itself now refuses scripted downloads).
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: Environment variables the loader reads.
ENV_DATA_DIR = "CRL_DATA_DIR"
ENV_MIRRORS = "CRL_MNIST_MIRRORS"

#: IDX magic numbers of the MNIST files: 0x0803 = unsigned bytes, 3 dims; 0x0801 = 1 dim.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

#: IDX dtype code -> numpy dtype (multi-byte types are big-endian in the file).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FIX = (
    "Delete the file so that it is downloaded again, or point --data-dir (or the "
    f"{ENV_DATA_DIR} environment variable) at a directory with intact MNIST files."
)


class MNISTError(RuntimeError):
    """MNIST files are missing, corrupt or cannot be downloaded; the message says what to do."""


@dataclass(repr=False)
class MNIST:
    """The four arrays of MNIST (or any data set in its layout, such as a 10k subset)."""

    train_images: np.ndarray  # uint8 (N, 28, 28)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray  # uint8 (M, 28, 28)
    test_labels: np.ndarray  # int64 (M,)
    #: Directory the files were read from (that of the training images if they were split).
    source: Path
    #: The exact file each array came from.
    files: dict[str, Path] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"MNIST(train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"source={str(self.source)!r})"
        )


# -- parsing -------------------------------------------------------------------------------


def _corrupt(path: Path, problem: str) -> MNISTError:
    return MNISTError(f"{path}: {problem}. {_FIX}")


def parse_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """Read one gzip-compressed IDX file completely, or raise :class:`MNISTError`.

    ``magic``, when given, is the 32-bit magic number the file must carry (dtype code and
    number of dimensions), e.g. :data:`IMAGES_MAGIC`. The decompressed payload must hold
    exactly the product of the header dimensions: missing or extra bytes are an error.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            if head != b"\x1f\x8b":
                raise _corrupt(path, "not a gzip file (wrong gzip signature)")
            fh.seek(0)
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                data = gz.read()
    except FileNotFoundError as exc:
        raise MNISTError(
            f"{path}: file not found. Point --data-dir (or {ENV_DATA_DIR}) at a directory "
            f"with the four MNIST files ({', '.join(MNIST_FILES.values())})."
        ) from exc
    except EOFError as exc:
        raise _corrupt(path, f"truncated gzip stream ({exc})") from exc
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError (CRC, bad data)
        raise _corrupt(path, f"damaged gzip data ({exc})") from exc

    if len(data) < 4:
        raise _corrupt(path, f"only {len(data)} bytes after decompression, no IDX header")
    zero0, zero1, code, ndim = struct.unpack(">BBBB", data[:4])
    found = struct.unpack(">I", data[:4])[0]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise _corrupt(path, f"wrong IDX magic number 0x{found:08x} (not an IDX file)")
    if magic is not None and found != magic:
        raise _corrupt(
            path,
            f"wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(dtype code 0x{(magic >> 8) & 0xFF:02x}, {magic & 0xFF} dimensions)",
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise _corrupt(path, f"IDX header truncated: {ndim} dimensions need {header_len} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        kind = "truncated" if payload < expected else "extra bytes after the data"
        raise _corrupt(
            path,
            f"payload size mismatch ({kind}): header dims {dims} need {expected} bytes, "
            f"file holds {payload}",
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# -- locations -----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/crl/mnist``, else ``~/.cache/crl/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "crl" / "mnist"


def resolve_data_dir(data_dir: str | Path | None = None) -> tuple[Path, bool]:
    """The directory to read, and whether the user chose it (argument or environment)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), True
    env = os.environ.get(ENV_DATA_DIR, "").strip()
    if env:
        return Path(env).expanduser(), True
    return default_cache_dir(), False


def resolve_mirrors(mirrors: Sequence[str] | str | None = None) -> list[str]:
    """``mirrors`` argument, else ``$CRL_MNIST_MIRRORS`` (comma separated), else :data:`MIRRORS`."""
    if mirrors is None:
        env = os.environ.get(ENV_MIRRORS, "").strip()
        mirrors = env if env else MIRRORS
    if isinstance(mirrors, str):
        mirrors = mirrors.split(",")
    out = [m.strip() for m in mirrors if m and m.strip()]
    bad = [m for m in out if urllib.parse.urlsplit(m).scheme not in ("http", "https", "file")]
    if bad:
        raise ValueError(
            f"MNIST mirrors must be http(s):// or file:// base URLs, got {', '.join(bad)}"
        )
    if not out:
        raise ValueError(
            f"no MNIST mirror given; pass base URLs such as {MIRRORS[0]!r} via mirrors= "
            f"or {ENV_MIRRORS}"
        )
    return out


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


# -- download ------------------------------------------------------------------------------


class _ChecksumMismatch(Exception):
    pass


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, verify md5, then move in place."""
    req = urllib.request.Request(url, headers={"User-Agent": "crl-mnist-loader"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, leave=False, disable=None
            ) as bar:
                received = 0
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:  # worth a retry, unlike a wrong checksum
            raise ConnectionError(f"connection closed after {received} of {total} bytes")
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise _ChecksumMismatch(
                f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {actual}; "
                "the file was not kept"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_file(
    filename: str,
    dest_dir: Path,
    mirrors: Sequence[str],
    md5: str,
    *,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 1.0,
) -> tuple[Path | None, list[str]]:
    """Try every mirror, ``retries`` rounds with exponential backoff between rounds.

    Returns ``(path, errors)``; ``path`` is None when every attempt failed. A mirror that
    answers 404 or serves a file with the wrong checksum is not asked again (retrying cannot
    help); network errors and server errors are retried.
    """
    dest = dest_dir / filename
    errors: list[str] = []
    active = list(mirrors)
    for attempt in range(max(1, retries)):
        if attempt and active and backoff > 0:
            time.sleep(backoff * 2 ** (attempt - 1))
        for base in list(active):
            url = base.rstrip("/") + "/" + filename
            try:
                _fetch(url, dest, md5, timeout)
                return dest, errors
            except _ChecksumMismatch as exc:
                errors.append(str(exc))
                active.remove(base)
            except urllib.error.HTTPError as exc:
                errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    active.remove(base)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # refused, DNS, timeout, reset, body shorter than Content-Length
                reason = getattr(exc, "reason", exc)
                errors.append(f"{url}: {reason}")
        if not active:
            break
    return None, errors


# -- loading -------------------------------------------------------------------------------


def load_mnist(
    data_dir: str | Path | None = None,
    download: bool = True,
    *,
    mirrors: Sequence[str] | str | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    checksums: Mapping[str, str] | None = None,
    backoff: float = 1.0,
) -> MNIST:
    """Load MNIST, downloading missing files where a network exists.

    Directory: ``data_dir``, else ``$CRL_DATA_DIR``, else the cache directory. Files present
    there are used after a structural check (no checksum: a user may supply a subset such as
    a 10k split). Missing files are downloaded into that directory when it is writable, else
    into the cache directory, and verified against ``checksums`` (file name -> md5; default
    :data:`MNIST_MD5`, overridable for local test mirrors). Files already downloaded stay
    even when a later one fails.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    directory, _ = resolve_data_dir(data_dir)
    sums = dict(MNIST_MD5 if checksums is None else checksums)
    unknown = [f for f in MNIST_FILES.values() if f not in sums]
    if unknown:
        raise ValueError(f"checksums= lacks the md5 of {', '.join(unknown)}")

    paths: dict[str, Path] = {}
    missing: list[str] = []
    for key, fname in MNIST_FILES.items():
        if (directory / fname).is_file():
            paths[key] = directory / fname
        else:
            missing.append(key)

    if missing and not download:
        names = ", ".join(MNIST_FILES[k] for k in missing)
        raise MNISTError(
            f"MNIST files missing in {directory}: {names}, and download=False. Put the four "
            f"files ({', '.join(MNIST_FILES.values())}) there, pass --data-dir DIR or set "
            f"{ENV_DATA_DIR}=DIR to a directory that has them, or allow the download."
        )

    if missing:
        target = directory if _writable_dir(directory) else default_cache_dir()
        if not _writable_dir(target):
            raise MNISTError(
                f"cannot download MNIST: neither {directory} nor the cache directory {target} "
                f"is writable. Pass --data-dir DIR (or set {ENV_DATA_DIR}=DIR) to a writable "
                "directory or to one that already holds the four files."
            )
        mirror_list = resolve_mirrors(mirrors)
        failures: dict[str, list[str]] = {}
        for key in missing:
            fname = MNIST_FILES[key]
            if (target / fname).is_file():  # e.g. an earlier download into the cache
                paths[key] = target / fname
                continue
            got, errors = download_file(
                fname,
                target,
                mirror_list,
                sums[fname],
                retries=retries,
                timeout=timeout,
                backoff=backoff,
            )
            if got is None:
                failures[fname] = errors
            else:
                paths[key] = got
        if failures:
            detail = "; ".join(err for errs in failures.values() for err in errs[-2:])
            raise MNISTError(
                "MNIST is not available: the four files "
                f"({', '.join(MNIST_FILES.values())}) were looked for in {directory} and "
                f"{', '.join(failures)} could not be downloaded into {target} from the mirrors "
                f"{', '.join(mirror_list)} (errors: {detail}). Files already downloaded are "
                f"kept. Fix: put the four files in a directory and pass --data-dir DIR or set "
                f"{ENV_DATA_DIR}=DIR, or set {ENV_MIRRORS} to reachable mirrors (comma "
                "separated base URLs)."
            )

    train_x = parse_idx(paths["train_images"], magic=IMAGES_MAGIC)
    train_y = parse_idx(paths["train_labels"], magic=LABELS_MAGIC)
    test_x = parse_idx(paths["test_images"], magic=IMAGES_MAGIC)
    test_y = parse_idx(paths["test_labels"], magic=LABELS_MAGIC)
    for xs, ys, kx, ky in (
        (train_x, train_y, "train_images", "train_labels"),
        (test_x, test_y, "test_images", "test_labels"),
    ):
        if xs.shape[1:] != (28, 28):
            raise _corrupt(paths[kx], f"images are {xs.shape[1]}x{xs.shape[2]}, expected 28x28")
        if len(xs) != len(ys):
            raise MNISTError(
                f"{paths[kx]} holds {len(xs)} images but {paths[ky]} holds {len(ys)} labels; "
                f"the files do not belong together. {_FIX}"
            )
        if ys.size and int(ys.max()) > 9:
            raise _corrupt(paths[ky], f"label {int(ys.max())} outside 0..9")

    dirs = {p.parent for p in paths.values()}
    if len(dirs) > 1:
        warnings.warn(
            f"MNIST files come from several directories: {sorted(map(str, dirs))}",
            stacklevel=2,
        )
    return MNIST(
        train_images=train_x,
        train_labels=train_y.astype(np.int64),
        test_images=test_x,
        test_labels=test_y.astype(np.int64),
        source=paths["train_images"].parent,
        files={k: paths[k] for k in MNIST_FILES},
    )


__all__ = [
    "ENV_DATA_DIR",
    "ENV_MIRRORS",
    "MIRRORS",
    "MNIST",
    "MNISTError",
    "MNIST_FILES",
    "MNIST_MD5",
    "default_cache_dir",
    "download_file",
    "load_mnist",
    "parse_idx",
    "resolve_data_dir",
    "resolve_mirrors",
]
