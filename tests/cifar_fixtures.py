"""Small CIFAR-10 stand-ins for tests: official-format folders, archives and a local HTTP server.

    >>> arrays = write_cifar10_folder(tmp_path, per_batch=4, test=6)  # writes cifar-10-batches-py/
    >>> payload = make_archive({"cifar-10-batches-py/test_batch": b"..."})
    >>> with serve({"/c.tar.gz": payload}) as base_url: ...

The batch files are written the way the official ones were (Python 2 ``cPickle``,
protocol 2): bytes as ``BINSTRING`` opcodes, the numpy array rebuilt through
``numpy.core.multiarray._reconstruct``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import pickle
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CLASSES = (b"airplane", b"automobile", b"bird", b"cat", b"deer")
CLASSES += (b"dog", b"frog", b"horse", b"ship", b"truck")


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler, to change how bytes are saved
    """Writes bytes as Python 2 ``str`` (BINSTRING) as cPickle did, not via ``_codecs.encode``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def official_pickle(obj: object, numpy_module: str = "numpy.core.multiarray") -> bytes:
    """``obj`` pickled as the official CIFAR-10 files are, naming ``numpy_module._reconstruct``."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", f"c{numpy_module}\n".encode())


def batch_dict(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    """The dict of one batch file: images uint8 (N, 3, 32, 32) become rows of 3072 values."""
    return {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(images.reshape(len(images), 3072), dtype=np.uint8),
        b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(images))],
    }


def write_cifar10_folder(
    root: Path,
    *,
    per_batch: int = 4,
    test: int = 5,
    seed: int = 0,
    numpy_module: str = "numpy.core.multiarray",
) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py`` with random images; return the arrays written.

    Returns train_images uint8 (5 * per_batch, 3, 32, 32), train_labels, test_images
    (test, 3, 32, 32), test_labels, in the order the loader should return them.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for name in TRAIN_FILES:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        (folder / name).write_bytes(official_pickle(batch_dict(images, labels, name), numpy_module))
        train_images.append(images)
        train_labels.append(labels)
    test_images = rng.integers(0, 256, (test, 3, 32, 32), dtype=np.uint8)
    test_labels = rng.integers(0, 10, test)
    (folder / "test_batch").write_bytes(
        official_pickle(batch_dict(test_images, test_labels, "test_batch"), numpy_module)
    )
    meta = {b"num_cases_per_batch": per_batch, b"label_names": list(CLASSES), b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(official_pickle(meta))
    return {
        "train_images": np.concatenate(train_images),
        "train_labels": np.concatenate(train_labels),
        "test_images": test_images,
        "test_labels": test_labels,
    }


def make_archive(members: dict[str, bytes | tuple[bytes, str]]) -> bytes:
    """A tar.gz of ``members``, in order: name -> file contents, or -> (link type, link target).

    A link type is ``tarfile.SYMTYPE``, ``tarfile.LNKTYPE`` or ``tarfile.CHRTYPE`` (a
    device); names are written verbatim, so ``"../evil"`` or ``"/tmp/evil"`` make hostile
    archives.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, contents in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(contents, tuple):
                info.type, info.linkname = contents
                tar.addfile(info)
            else:
                info.size = len(contents)
                tar.addfile(info, io.BytesIO(contents))
    return buffer.getvalue()


def folder_archive(root: Path) -> bytes:
    """The tar.gz of ``root/cifar-10-batches-py``, laid out like the official release."""
    folder = Path(root) / "cifar-10-batches-py"
    return make_archive(
        {f"cifar-10-batches-py/{path.name}": path.read_bytes() for path in sorted(folder.iterdir())}
    )


def md5(payload: bytes) -> str:
    """Hex MD5 of ``payload``."""
    return hashlib.md5(payload).hexdigest()


@contextlib.contextmanager
def serve(files: dict[str, bytes], *, cut_after: int | None = None) -> Iterator[str]:
    """Serve ``files`` (URL path -> bytes) on 127.0.0.1; yield the base URL.

    With ``cut_after``, the server announces the full Content-Length, sends only that many
    bytes and drops the connection, like a network failure mid-download.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            payload = files.get(self.path)
            if payload is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload if cut_after is None else payload[:cut_after])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
