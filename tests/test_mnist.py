"""MNIST loader: IDX parsing, structural validation, and the download path on a local server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from idx_files import MNIST_FILES, idx_bytes, make_tiny_mnist, tiny_mnist_arrays, write_idx

import crl.supervised.mnist as mnist_module
from crl.supervised.mnist import (
    ENV_DATA_DIR,
    ENV_MIRRORS,
    IMAGES_MAGIC,
    MNIST_MD5,
    MNISTError,
    load_mnist,
    parse_idx,
)

FILENAMES = list(MNIST_FILES.values())


def _md5s(directory: Path) -> dict[str, str]:
    return {f: hashlib.md5((directory / f).read_bytes()).hexdigest() for f in FILENAMES}


def _gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw, mtime=0))
    return path


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
        np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32),
        np.array([0.5, -1.25, 3e10], dtype=np.float64),
        np.array([-3, 0, 7], dtype=np.int16),
    ],
)
def test_parse_round_trip(tmp_path: Path, array: np.ndarray) -> None:
    out = parse_idx(write_idx(tmp_path / "a.gz", array))
    assert out.shape == array.shape
    assert out.dtype == array.dtype  # native byte order, same kind and width
    np.testing.assert_array_equal(out, array)


def test_parse_header_bytes_are_standard(tmp_path: Path) -> None:
    # Hand-built file: magic 0x00000801 (ubyte, 1 dim), dim 3, payload 7 8 9.
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])
    np.testing.assert_array_equal(parse_idx(_gz(tmp_path / "l.gz", raw)), [7, 8, 9])
    assert idx_bytes(np.array([7, 8, 9], dtype=np.uint8)) == raw


def test_truncated_gzip_raises(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (50, 28, 28)).astype(np.uint8)
    good = write_idx(tmp_path / "good.gz", arr)
    bad = tmp_path / "cut.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MNISTError, match="truncated gzip") as err:
        parse_idx(bad)
    assert str(bad) in str(err.value) and "Delete the file" in str(err.value)
    assert "--data-dir" in str(err.value)


def test_corrupt_payload_raises(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 255, (20, 28, 28)).astype(np.uint8)
    data = bytearray(write_idx(tmp_path / "x.gz", arr).read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):  # garble the deflate stream
        data[i] ^= 0xA5
    bad = tmp_path / "corrupt.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(MNISTError, match="gzip") as err:
        parse_idx(bad)
    assert str(bad) in str(err.value)


def test_crc_mismatch_raises(tmp_path: Path) -> None:
    data = bytearray(write_idx(tmp_path / "x.gz", np.zeros((3, 28, 28), np.uint8)).read_bytes())
    data[-8] ^= 0xFF  # CRC32 field of the gzip trailer; the deflate data itself is intact
    bad = tmp_path / "crc.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(MNISTError, match="damaged gzip"):
        parse_idx(bad)


def test_not_gzip_raises(tmp_path: Path) -> None:
    plain = tmp_path / "plain.gz"
    plain.write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(MNISTError, match="not a gzip file"):
        parse_idx(plain)


def test_wrong_magic_raises(tmp_path: Path) -> None:
    bad = _gz(tmp_path / "m.gz", bytes([1, 2, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(MNISTError, match="wrong IDX magic number 0x01020801"):
        parse_idx(bad)
    unknown_dtype = _gz(tmp_path / "d.gz", bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(MNISTError, match="wrong IDX magic"):
        parse_idx(unknown_dtype)
    labels = write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(MNISTError, match="0x00000801, expected 0x00000803"):
        parse_idx(labels, magic=IMAGES_MAGIC)


@pytest.mark.parametrize(("payload", "kind"), [(9, "truncated"), (11, "extra bytes")])
def test_size_mismatch_raises(tmp_path: Path, payload: int, kind: str) -> None:
    raw = struct.pack(">BBBBI", 0, 0, 8, 1, 10) + bytes(payload)
    with pytest.raises(MNISTError, match=f"payload size mismatch \\({kind}") as err:
        parse_idx(_gz(tmp_path / "s.gz", raw))
    assert "need 10 bytes, file holds " + str(payload) in str(err.value)


def test_truncated_header_raises(tmp_path: Path) -> None:
    with pytest.raises(MNISTError, match="header truncated"):
        parse_idx(_gz(tmp_path / "h.gz", bytes([0, 0, 8, 3, 0, 0, 0, 1])))


# -- loading from a directory --------------------------------------------------------------


def test_load_tiny(tiny_mnist_dir: Path) -> None:
    m = load_mnist(tiny_mnist_dir, download=False)
    assert m.train_images.shape == (600, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_images.shape == (200, 28, 28) and m.test_images.dtype == np.uint8
    assert m.train_labels.dtype == np.int64 and m.test_labels.dtype == np.int64
    assert np.bincount(m.train_labels).tolist() == [60] * 10
    assert np.bincount(m.test_labels).tolist() == [20] * 10
    assert m.source == tiny_mnist_dir
    x, y = tiny_mnist_arrays(60, seed=0)
    np.testing.assert_array_equal(m.train_images, x)
    np.testing.assert_array_equal(m.train_labels, y)


def test_count_mismatch_and_label_range(tmp_path: Path, tiny_mnist_dir: Path) -> None:
    d = shutil.copytree(tiny_mnist_dir, tmp_path / "d")
    write_idx(d / MNIST_FILES["test_labels"], np.zeros(199, np.uint8))
    with pytest.raises(MNISTError, match="200 images but .* holds 199 labels"):
        load_mnist(d, download=False)
    write_idx(d / MNIST_FILES["test_labels"], np.full(200, 10, np.uint8))
    with pytest.raises(MNISTError, match="label 10 outside 0..9"):
        load_mnist(d, download=False)


def test_swapped_files_rejected(tmp_path: Path, tiny_mnist_dir: Path) -> None:
    d = shutil.copytree(tiny_mnist_dir, tmp_path / "d")
    os.replace(d / MNIST_FILES["train_labels"], d / "tmp")
    os.replace(d / MNIST_FILES["train_images"], d / MNIST_FILES["train_labels"])
    os.replace(d / "tmp", d / MNIST_FILES["train_images"])
    with pytest.raises(MNISTError, match="train-images-idx3-ubyte.gz: wrong IDX magic"):
        load_mnist(d, download=False)


def test_missing_without_download(tmp_path: Path, tiny_mnist_dir: Path) -> None:
    d = shutil.copytree(tiny_mnist_dir, tmp_path / "d")
    (d / MNIST_FILES["test_images"]).unlink()
    with pytest.raises(MNISTError) as err:
        load_mnist(d, download=False)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(d) in msg and "download=False" in msg
    assert ENV_DATA_DIR in msg and "--data-dir" in msg


def test_env_data_dir_honoured(monkeypatch: pytest.MonkeyPatch, tiny_mnist_dir: Path) -> None:
    monkeypatch.setenv(ENV_DATA_DIR, str(tiny_mnist_dir))
    m = load_mnist(download=False)
    assert m.source == tiny_mnist_dir and len(m.train_labels) == 600


def test_explicit_dir_beats_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_mnist_dir: Path
) -> None:
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "nowhere"))
    assert load_mnist(tiny_mnist_dir, download=False).source == tiny_mnist_dir


def test_default_md5_table_is_official() -> None:
    # The two t10k sums are also quoted in /work/shared/data/mnist-10k/README.md.
    assert MNIST_MD5["t10k-images-idx3-ubyte.gz"] == "9fb629c4189551a2d022fa330f9573f3"
    assert MNIST_MD5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    assert set(MNIST_MD5) == set(FILENAMES)


# -- download path on a local HTTP server --------------------------------------------------


class _Server:
    """Serves ``root``: /good/ (the files), /bad/ (other bytes), /half/ (train files only),
    /broken/ (HTTP 500); anything absent is a 404. Records every requested path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with lock:
                    outer.requests.append(self.path)
                if self.path.startswith("/broken/"):
                    self.send_error(500, "boom")
                    return
                if self.path.startswith("/short/"):  # promises more bytes than it sends
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\x1f\x8b" + bytes(100))
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Server, dict[str, str]]]:
    root = tmp_path_factory.mktemp("mirror")
    make_tiny_mnist(root / "good", 3, 2, seed=1)
    make_tiny_mnist(root / "bad", 3, 2, seed=2)
    (root / "half").mkdir()
    for f in (MNIST_FILES["train_images"], MNIST_FILES["train_labels"]):
        shutil.copy(root / "good" / f, root / "half" / f)
    server = _Server(root)
    try:
        yield server, _md5s(root / "good")
    finally:
        server.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def _quick(**kw):
    return {"retries": 2, "timeout": 5, "backoff": 0.0, **kw}


def test_download_then_cache(served, tmp_path: Path) -> None:
    server, sums = served
    server.requests.clear()
    d = tmp_path / "data"
    m = load_mnist(d, mirrors=[server.url + "/good/"], checksums=sums, **_quick())
    assert sorted(server.requests) == sorted(f"/good/{f}" for f in FILENAMES)
    assert sorted(p.name for p in d.iterdir()) == sorted(FILENAMES)  # no .part left over
    assert len(m.train_labels) == 30 and len(m.test_labels) == 20
    x, _ = tiny_mnist_arrays(3, seed=1)
    np.testing.assert_array_equal(m.train_images, x)
    again = load_mnist(d, mirrors=[server.url + "/good/"], checksums=sums, **_quick())
    assert len(server.requests) == 4  # second call read the files already there
    np.testing.assert_array_equal(again.test_images, m.test_images)


def test_retries_across_mirrors(served, tmp_path: Path) -> None:
    server, sums = served
    server.requests.clear()
    mirrors = [server.url + "/missing/", server.url + "/broken/", server.url + "/good"]
    m = load_mnist(tmp_path / "d", mirrors=mirrors, checksums=sums, **_quick())
    assert len(m.train_labels) == 30
    first = MNIST_FILES["train_images"]
    assert server.requests[:3] == [f"/missing/{first}", f"/broken/{first}", f"/good/{first}"]


def test_interrupted_download_leaves_nothing(served, tmp_path: Path) -> None:
    server, sums = served
    server.requests.clear()
    d = tmp_path / "d"
    with pytest.raises(MNISTError, match="connection closed after 102 of 100000 bytes"):
        load_mnist(d, mirrors=[server.url + "/short/"], checksums=sums, **_quick())
    assert list(d.iterdir()) == []
    assert server.requests.count("/short/" + FILENAMES[0]) == 2  # retried (retries=2)


def test_bad_mirror_url_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http\\(s\\):// or file://"):
        load_mnist(tmp_path, mirrors=["example.org/mnist"])


def test_checksum_mismatch_not_kept(served, tmp_path: Path) -> None:
    server, sums = served
    d = tmp_path / "d"
    with pytest.raises(MNISTError) as err:
        load_mnist(d, mirrors=[server.url + "/bad/"], checksums=sums, **_quick())
    msg = str(err.value)
    first = MNIST_FILES["train_images"]
    assert f"expected md5 {sums[first]}, got " in msg and "not kept" in msg
    assert list(d.iterdir()) == []  # neither the bad file nor a temporary file remains


def test_partial_download_keeps_finished_files(served, tmp_path: Path) -> None:
    server, sums = served
    d = tmp_path / "d"
    with pytest.raises(MNISTError, match="t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"):
        load_mnist(d, mirrors=[server.url + "/half/"], checksums=sums, **_quick())
    kept = sorted(p.name for p in d.iterdir())
    assert kept == sorted([MNIST_FILES["train_images"], MNIST_FILES["train_labels"]])
    # A later call with a working mirror fetches only what is missing.
    server.requests.clear()
    load_mnist(d, mirrors=[server.url + "/good/"], checksums=sums, **_quick())
    assert sorted(server.requests) == sorted(
        f"/good/{MNIST_FILES[k]}" for k in ("test_images", "test_labels")
    )


def test_no_network_no_files(tmp_path: Path) -> None:
    url = _closed_port_url()
    d = tmp_path / "empty"
    with pytest.raises(MNISTError) as err:
        load_mnist(d, mirrors=[url], **_quick())
    msg = str(err.value)
    for f in FILENAMES:
        assert f in msg
    assert str(d) in msg and ENV_DATA_DIR in msg and "--data-dir" in msg and url in msg
    assert list(d.iterdir()) == []


def test_env_mirrors_and_cache_dir(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, sums = served
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(ENV_MIRRORS, f"{_closed_port_url()},{server.url}/good/")
    m = load_mnist(checksums=sums, **_quick(retries=1))
    assert m.source == tmp_path / "cache" / "crl" / "mnist"
    assert sorted(p.name for p in m.source.iterdir()) == sorted(FILENAMES)


def test_read_only_dir_falls_back_to_cache(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, sums = served
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(server.root / "good" / FILENAMES[0], ro / FILENAMES[0])
    # Permissions do not bind root (tests may run as root), so the check itself is patched.
    real = mnist_module._writable_dir
    monkeypatch.setattr(mnist_module, "_writable_dir", lambda p: p != ro and real(p))
    with pytest.warns(UserWarning, match="several directories"):
        m = load_mnist(ro, mirrors=[server.url + "/good/"], checksums=sums, **_quick())
    assert m.files["train_images"] == ro / FILENAMES[0]
    assert m.files["test_images"].parent == tmp_path / "cache" / "crl" / "mnist"
    assert sorted(p.name for p in ro.iterdir()) == [FILENAMES[0]]


# -- optional real data --------------------------------------------------------------------


def test_real_mnist_if_available() -> None:
    env = os.environ.get(ENV_DATA_DIR, "")
    if not env or not all((Path(env) / f).is_file() for f in FILENAMES):
        pytest.skip(f"{ENV_DATA_DIR} does not point at a directory with the four MNIST files")
    m = load_mnist(env, download=False)
    counts = (len(m.train_labels), len(m.test_labels))
    assert counts in {(8000, 2000), (60000, 10000)}  # the shared 10k split or full MNIST
    assert set(m.train_labels.tolist()) == set(range(10)) == set(m.test_labels.tolist())
    assert m.train_images.shape[1:] == (28, 28) and m.train_images.max() == 255
