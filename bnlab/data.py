"""CIFAR-10, online and offline: find it, download it, read it safely, batch it on the device.

:func:`load_cifar10` looks for the data in this order (SPEC, "Data, online and offline"):

1. ``data_dir`` when given: a folder holding ``cifar-10-batches-py/``, or that folder itself.
   A named folder that holds no usable CIFAR-10 is an error, never a silent fallback.
2. The cache folder (``$BNLAB_CACHE``, else ``$XDG_CACHE_HOME/bnlab``, else
   ``~/.cache/bnlab``) when it holds the extracted official release.
3. A download of the official release into the cache, attempted only when the server
   answers within ``timeout`` seconds; MD5-verified and extracted safely.
4. The real CIFAR-10 sample bnlab carries as package data (5,085 train / 1,017 test
   images: the first 1,017 of each official batch file), with a one-line notice on stderr.

Batch files are pickles; they are read with a restricted unpickler that resolves only the
numpy globals an array needs, so a malicious file raises :class:`DataError` and runs nothing.

    >>> import torch
    >>> from bnlab.data import load_cifar10, train_batches, test_batches
    >>> ds = load_cifar10(download=False)   # doctest: +SKIP
    >>> ds.source                           # doctest: +SKIP
    'CIFAR-10 embedded sample (5085 train / 1017 test) — not the full data set'
    >>> g = torch.Generator().manual_seed(0)
    >>> for images, labels in train_batches(ds, 128, generator=g):  # doctest: +SKIP
    ...     pass                            # images: float32 (128, 3, 32, 32), normalized

Shapes: N images, C = 3 channels (R, G, B), H = W = 32. Images are stored as uint8
(N, 3, 32, 32) and only become floats batch by batch, on the device they are batched on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import io
import lzma
import os
import pickle
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ARCHIVE_NAME",
    "BATCHES_DIR",
    "CIFAR10",
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "CLASSES",
    "EMBEDDED_SAMPLE_PATH",
    "EMBEDDED_SAMPLE_SHA256",
    "DataError",
    "DownloadError",
    "default_cache_dir",
    "download_cifar10",
    "extract_cifar10_archive",
    "find_batches_dir",
    "load_cifar10",
    "load_cifar10_dir",
    "load_embedded_sample",
    "normalize",
    "random_crop_flip",
    "read_batch",
    "test_batches",
    "train_batches",
    "write_embedded_sample",
]

# ---------------------------------------------------------------------------------------------
# The official release and the embedded sample
# ---------------------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
FULL_TRAIN, FULL_TEST = 50_000, 10_000
IMAGE_SHAPE = (3, 32, 32)  # C, H, W; a batch-file row is 1024 R, then 1024 G, then 1024 B values

# Per-channel mean and standard deviation of the 50,000 CIFAR-10 training images, pixels
# scaled to [0, 1], statistics over all N*H*W values of a channel.
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

EMBEDDED_SAMPLE_PATH = Path(__file__).resolve().parent / "assets" / "cifar10_sample.npz.xz"
# SHA-256 of the asset as written by tools/make_embedded_sample.py (deterministic output).
EMBEDDED_SAMPLE_SHA256 = "d280f3652e0f79aa304e6fdde07c158111414c7279b6358c9c24c73ac706548e"
EMBEDDED_TRAIN, EMBEDDED_TEST = 5085, 1017
_EMBEDDED_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")

_HOW_TO_GET_FULL = (
    "For the full data set pass --data-dir DIR (a folder holding cifar-10-batches-py/) "
    "or allow the download (needs internet)."
)


class DataError(ValueError):
    """Data that is missing, corrupt, unsafe or not CIFAR-10; the message names the file."""


class DownloadError(DataError):
    """A download that could not complete (no answer, dropped connection, checksum mismatch).

    Nothing it wrote is kept, so a later run never trusts a half-written file.
    """


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CIFAR10:
    """CIFAR-10 images and labels, with a description of exactly which data they are.

    Attributes:
        train_images: uint8 (N, 3, 32, 32), channels R, G, B.
        train_labels: int64 (N,), class indices 0..9 into ``classes``.
        test_images: uint8 (M, 3, 32, 32).
        test_labels: int64 (M,).
        source: what the data is, for every summary and report, e.g.
            ``"CIFAR-10 (full: 50000 train / 10000 test) from /data/cifar-10-batches-py"``.
        classes: the ten class names.

        >>> ds = load_cifar10(download=False)          # doctest: +SKIP
        >>> small = ds.subset(256, seed=0)             # doctest: +SKIP
        >>> small.source                               # doctest: +SKIP
        'CIFAR-10 embedded sample (...) — not the full ...; subset of 256 train images (seed 0)'
        >>> small = small.to("cuda")                   # doctest: +SKIP
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_SHAPE:
                raise ValueError(
                    f"{split}_images must be uint8 (N, 3, 32, 32), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels must be int64 ({images.shape[0]},), "
                    f"got {labels.dtype} {tuple(labels.shape)}"
                )
        if len(self.classes) != 10:
            raise ValueError(f"CIFAR-10 has 10 classes, got {len(self.classes)}: {self.classes}")

    @property
    def num_train(self) -> int:
        """Number of training images N."""
        return self.train_images.shape[0]

    @property
    def num_test(self) -> int:
        """Number of test images M."""
        return self.test_images.shape[0]

    @property
    def is_full(self) -> bool:
        """True only for the full 50,000 / 10,000 split: sample results are not CIFAR-10 results."""
        return self.num_train == FULL_TRAIN and self.num_test == FULL_TEST

    @property
    def device(self) -> torch.device:
        """The device the images are on."""
        return self.train_images.device

    def subset(self, n: int, seed: int = 0) -> CIFAR10:
        """The first ``n`` training images after a shuffle seeded with ``seed``; test set unchanged.

        Not class-balanced: each class gets about n/10 images.

            >>> ds.subset(1000, seed=1).num_train      # doctest: +SKIP
            1000
        """
        if not 1 <= n <= self.num_train:
            raise ValueError(
                f"subset size {n} is outside 1..{self.num_train}, the training images of "
                f"{self.source}: use a smaller subset"
            )
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(self.num_train, generator=generator)[:n].to(self.device)
        return dataclasses.replace(
            self,
            train_images=self.train_images[index],
            train_labels=self.train_labels[index],
            source=f"{self.source}; subset of {n} train images (seed {seed})",
        )

    def to(self, device: torch.device | str) -> CIFAR10:
        """The same data with its tensors (still uint8 / int64) on ``device``.

        >>> ds_gpu = ds.to("cuda")                 # doctest: +SKIP
        """
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def __repr__(self) -> str:
        return (
            f"CIFAR10(train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, device={self.device}, source={self.source!r})"
        )


def _dataset(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    source: str,
    classes: tuple[str, ...] = CLASSES,
) -> CIFAR10:
    """Wrap numpy arrays (images uint8 (N, 3, 32, 32), labels int (N,)) as a CIFAR10."""
    return CIFAR10(
        train_images=torch.from_numpy(np.ascontiguousarray(train[0], dtype=np.uint8)),
        train_labels=torch.from_numpy(np.asarray(train[1], dtype=np.int64)),
        test_images=torch.from_numpy(np.ascontiguousarray(test[0], dtype=np.uint8)),
        test_labels=torch.from_numpy(np.asarray(test[1], dtype=np.int64)),
        source=source,
        classes=classes,
    )


# ---------------------------------------------------------------------------------------------
# Reading the official batch files safely
# ---------------------------------------------------------------------------------------------

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# Everything a CIFAR-10 batch pickle may name: how numpy rebuilds an ndarray (module names
# of numpy 1.x, as in the official files, and of numpy 2.x). Dicts, lists, bytes and ints
# need no globals. Anything else -- os.system, builtins.exec, ... -- is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``_ALLOWED_GLOBALS``: nothing else is imported or called."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path} is not a CIFAR-10 batch file: it asks to load the Python global "
                f"'{module}.{name}', which bnlab refuses (a CIFAR-10 batch holds only numpy "
                "arrays, lists and bytes; loading it could run code). "
                "Replace it with the file from the official release."
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise DataError(
            f"{self._path} is not a CIFAR-10 batch file: it holds a persistent reference, "
            "which bnlab refuses. Replace it with the file from the official release."
        )


def _unpickle(path: Path) -> object:
    """Unpickle ``path`` with the restricted unpickler; every failure is a DataError naming it."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: a CIFAR-10 folder needs it") from None
    except OSError as error:
        raise DataError(f"{path} could not be read: {error}") from error
    try:
        return _RestrictedUnpickler(io.BytesIO(payload), path).load()
    except DataError:
        raise
    except Exception as error:  # anything a truncated or corrupt byte stream makes it raise
        if isinstance(error, EOFError) or "truncated" in str(error):
            raise DataError(
                f"{path} is truncated ({len(payload)} bytes, the pickle ends early): "
                "delete it and get the official release again"
            ) from None
        raise DataError(
            f"{path} is corrupt, not a readable CIFAR-10 batch file "
            f"({type(error).__name__}: {error}): delete it and get the official release again"
        ) from None


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official batch file (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    Returns ``(images, labels)``: images uint8 (N, 3, 32, 32) -- a file row of 3072 values
    is the 1024 R values of a 32x32 image, then G, then B -- and labels int64 (N,) in 0..9.

        >>> images, labels = read_batch("cifar-10-batches-py/test_batch")   # doctest: +SKIP
        >>> images.shape, labels.shape                                      # doctest: +SKIP
        ((10000, 3, 32, 32), (10000,))
    """
    path = Path(path)
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is not a CIFAR-10 batch file: expected a dict with b'data' and b'labels', "
            f"found {found!r}"
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        description = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(
            f"{path} is not a CIFAR-10 batch file: b'data' should be a uint8 array of shape "
            f"(N, 3072), found a {description}"
        )
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path} has the wrong shape: b'data' is {data.shape}, expected (N, 3072) "
            "(one 32x32 RGB image per row)"
        )
    try:
        labels = np.asarray(batch[b"labels"])
    except Exception as error:
        raise DataError(f"{path} has unreadable b'labels': {error}") from None
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path} has the wrong labels: expected {data.shape[0]} integers (one per image), "
            f"found {labels.dtype} of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(
            f"{path} has labels out of range: found {labels.min()}..{labels.max()}, "
            f"CIFAR-10 labels are 0..{len(CLASSES) - 1}"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def _read_class_names(path: Path) -> tuple[str, ...]:
    """The class names from ``batches.meta``; the standard names if the file is absent."""
    if not path.exists():
        return CLASSES
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if (
        not isinstance(names, list)
        or len(names) != len(CLASSES)
        or not all(isinstance(name, bytes) for name in names)
    ):
        raise DataError(
            f"{path} is not CIFAR-10's batches.meta: expected b'label_names' with 10 names"
        )
    return tuple(name.decode("utf-8", "replace") for name in names)


def _where_to_put_it() -> str:
    return (
        f"expected a folder holding {BATCHES_DIR}/ (data_batch_1 .. data_batch_5, test_batch, "
        f"batches.meta), or that folder itself. Pass --data-dir to such a folder, or leave "
        f"--data-dir out to let bnlab download CIFAR-10 (needs internet) or use its embedded sample"
    )


def find_batches_dir(data_dir: str | Path) -> Path:
    """The ``cifar-10-batches-py`` folder in ``data_dir``, or ``data_dir`` itself if it is one.

    >>> find_batches_dir("~/data")                  # doctest: +SKIP
    PosixPath('/home/me/data/cifar-10-batches-py')
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist: {_where_to_put_it()}")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder: {_where_to_put_it()}")
    for folder in (root / BATCHES_DIR, root):
        present = [name for name in (*TRAIN_FILES, TEST_FILE) if (folder / name).exists()]
        if present:
            missing = [name for name in (*TRAIN_FILES, TEST_FILE) if name not in present]
            if missing:
                raise DataError(
                    f"CIFAR-10 in {folder} is incomplete: {', '.join(missing)} missing. "
                    "Get the official release again (delete the folder to let bnlab re-download)"
                )
            return folder
    raise DataError(f"CIFAR-10 not found in {root}: {_where_to_put_it()}")


def load_cifar10_dir(data_dir: str | Path) -> CIFAR10:
    """Read CIFAR-10 from a folder in the official python format (see :func:`find_batches_dir`).

    The batch files may hold any number of images each (the sample in
    ``shared/data/cifar10-sample`` holds 1,017 per file); ``source`` says which.

        >>> ds = load_cifar10_dir("~/data/cifar")       # doctest: +SKIP
        >>> ds.source                                   # doctest: +SKIP
        'CIFAR-10 (full: 50000 train / 10000 test) from /home/me/data/cifar/cifar-10-batches-py'
    """
    folder = find_batches_dir(data_dir)
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILE)
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    classes = _read_class_names(folder / META_FILE)
    n, m = len(train_images), len(test_images)
    if n == FULL_TRAIN and m == FULL_TEST:
        source = f"CIFAR-10 (full: {n} train / {m} test) from {folder}"
    else:
        source = f"CIFAR-10 from {folder} ({n} train / {m} test) — not the full data set"
    return _dataset(
        (train_images, train_labels), (test_images.copy(), test_labels), source, classes
    )


# ---------------------------------------------------------------------------------------------
# Downloading and extracting the official release
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$BNLAB_CACHE``, else ``$XDG_CACHE_HOME/bnlab``, else ``~/.cache/bnlab``.

    >>> default_cache_dir()                         # doctest: +SKIP
    PosixPath('/home/me/.cache/bnlab')
    """
    if os.environ.get("BNLAB_CACHE"):
        return Path(os.environ["BNLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "bnlab"
    return Path.home() / ".cache" / "bnlab"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _connect_error(url: str, timeout: float) -> str | None:
    """Why the server of ``url`` (or its proxy) is silent for ``timeout`` s; None if it does.

    The attempt runs in a daemon thread so that a hanging name lookup cannot block us either.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: dict[str, object] = {}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=attempt, name="bnlab-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in outcome:
        return None
    return (
        f"no answer from {host}:{port} within {timeout:g} s ({outcome.get('error', 'timed out')})"
    )


def _fetch(url: str, destination: Path, md5: str, timeout: float, quiet: bool) -> None:
    """Download ``url`` (whose server answered) to ``destination`` via a temporary name.

    Only a file whose MD5 matches is renamed (atomically) to ``destination``; anything else
    is deleted, so an interrupted or corrupt download is never found there by a later run.
    """
    if not quiet:
        print(f"bnlab: downloading {url} to {destination.parent} ...", file=sys.stderr)
    fd, part_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    part = Path(part_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=max(timeout, 30.0)) as response,
        ):
            expected = response.headers.get("Content-Length")
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                received += len(block)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != int(expected):
            raise DownloadError(
                f"download of {url} broke off after {received} of {expected} bytes; "
                "nothing was kept, try again"
            )
        if digest.hexdigest() != md5:
            raise DownloadError(
                f"checksum mismatch for {url}: MD5 {digest.hexdigest()}, expected {md5}; "
                "the download was discarded. Try again, or fetch it yourself and pass --data-dir"
            )
        os.replace(part, destination)
        if not quiet:
            print(f"bnlab: {received / 1e6:.0f} MB received, MD5 verified", file=sys.stderr)
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets, ...
        raise DownloadError(f"download of {url} failed: {error}; nothing was kept") from error
    finally:
        part.unlink(missing_ok=True)


def _member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The relative path of a safe archive member; a DataError for anything that could escape."""
    name = member.name

    def refuse(why: str) -> DataError:
        return DataError(f"{archive} is unsafe and was not extracted: member {name!r} {why}")

    if not (member.isfile() or member.isdir()):
        kind = (
            "a symlink" if member.issym() else "a hard link" if member.islnk() else "a special file"
        )
        raise refuse(f"is {kind}; the CIFAR-10 archive holds only files and folders")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise refuse("has an absolute path")
    parts = [part for part in PurePosixPath(name).parts if part != "."]
    if ".." in parts:
        raise refuse("climbs out of the target folder with '..'")
    if not parts or parts[0] != BATCHES_DIR:
        raise refuse(f"lies outside {BATCHES_DIR}/")
    return PurePosixPath(*parts)


def extract_cifar10_archive(archive: str | Path, dest_dir: str | Path) -> Path:
    """Extract the release into ``dest_dir``; return ``dest_dir/cifar-10-batches-py``.

    Safe against hostile archives: every member must be a plain file or folder under
    ``cifar-10-batches-py/`` (no absolute paths, ``..``, links or devices), and nothing is
    written outside ``dest_dir``. Extraction goes to a temporary folder that is renamed into
    place only when complete, so an interrupted run leaves nothing a later run would trust.

        >>> extract_cifar10_archive("cifar-10-python.tar.gz", "~/data")   # doctest: +SKIP
        PosixPath('/home/me/data/cifar-10-batches-py')
    """
    archive, dest_dir = Path(archive), Path(dest_dir).expanduser()
    target = dest_dir / BATCHES_DIR
    staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".cifar-10-extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                path = staging / _member_path(member, archive)
                if member.isdir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has contents
                with source, open(path, "xb") as out:
                    shutil.copyfileobj(source, out)
        missing = [
            n for n in (*TRAIN_FILES, TEST_FILE) if not (staging / BATCHES_DIR / n).is_file()
        ]
        if missing:
            raise DataError(f"{archive} is not the CIFAR-10 archive: {', '.join(missing)} missing")
        try:
            os.rename(staging / BATCHES_DIR, target)
        except OSError:
            if not target.is_dir():  # lost a race with another process: fine if it finished
                raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise DataError(f"{archive} could not be extracted: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_cifar10(
    dest_dir: str | Path,
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    timeout: float = 3.0,
    quiet: bool = False,
) -> Path:
    """Get the official release into ``dest_dir``; return ``dest_dir/cifar-10-batches-py``.

    Does nothing if the folder is already there. Uses a ``cifar-10-python.tar.gz`` already
    in ``dest_dir`` if its MD5 matches; otherwise downloads ``url`` -- only if the server
    answers within ``timeout`` seconds (later reads may take up to 30 s each) -- verifies
    the MD5, extracts safely and deletes the downloaded archive.

    Raises :class:`DownloadError` when the download cannot complete, :class:`DataError`
    for a bad archive already there or an unsafe one.

        >>> download_cifar10("~/.cache/bnlab")          # doctest: +SKIP
        PosixPath('/home/me/.cache/bnlab/cifar-10-batches-py')
    """
    dest_dir = Path(dest_dir).expanduser()
    target = dest_dir / BATCHES_DIR
    if target.is_dir():
        return target
    archive = dest_dir / ARCHIVE_NAME
    downloaded = not archive.exists()
    if downloaded:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"cannot download {url}: only http and https URLs are supported")
        reason = _connect_error(url, timeout)
        if reason is not None:
            raise DownloadError(f"cannot download {url}: {reason}")
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DownloadError(f"cannot create the data folder {dest_dir}: {error}") from error
        _fetch(url, archive, md5, timeout, quiet)
    elif _md5(archive) != md5:
        raise DataError(
            f"checksum mismatch for {archive}: MD5 {_md5(archive)}, expected {md5}. "
            "Delete it and let bnlab download it again"
        )
    try:
        return extract_cifar10_archive(archive, dest_dir)
    finally:
        if downloaded:
            archive.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The embedded sample
# ---------------------------------------------------------------------------------------------


def _pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic .npz (fixed timestamps, stored): the asset rebuilds bit for bit."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with archive.open(info, "w") as out:
                np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_embedded_sample(dataset: CIFAR10, path: str | Path = EMBEDDED_SAMPLE_PATH) -> str:
    """Write ``dataset`` as an xz-compressed .npz (the embedded-sample format); return its SHA-256.

    Used by ``tools/make_embedded_sample.py``; the output depends only on the arrays.

        >>> sample = load_cifar10_dir("shared/data/cifar10-sample")  # doctest: +SKIP
        >>> sha256 = write_embedded_sample(sample)                    # doctest: +SKIP
    """
    path = Path(path)
    arrays = {name: getattr(dataset, name).cpu().numpy() for name in _EMBEDDED_ARRAYS}
    arrays["train_labels"] = arrays["train_labels"].astype(np.uint8)  # 0..9; int64 on load
    arrays["test_labels"] = arrays["test_labels"].astype(np.uint8)
    payload = lzma.compress(
        _pack_arrays(arrays), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME
    )
    part = path.with_name(path.name + ".part")
    part.write_bytes(payload)
    os.replace(part, path)
    return hashlib.sha256(payload).hexdigest()


_decoded_samples: dict[str, dict[str, np.ndarray]] = {}  # EMBEDDED_SAMPLE_SHA256 -> arrays


def load_embedded_sample(
    path: str | Path = EMBEDDED_SAMPLE_PATH, *, sha256: str = EMBEDDED_SAMPLE_SHA256
) -> CIFAR10:
    """The real CIFAR-10 sample bnlab ships: 5,085 train / 1,017 test images, SHA-256 verified.

    The first 1,017 images of each official batch file, with their official labels and order.

        >>> ds = load_embedded_sample()
        >>> ds.num_train, ds.num_test
        (5085, 1017)
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"bnlab's embedded CIFAR-10 sample {path} could not be read ({error}): "
            "reinstall bnlab, or pass --data-dir to a CIFAR-10 folder"
        ) from error
    actual = hashlib.sha256(payload).hexdigest()
    if actual != sha256:
        raise DataError(
            f"checksum mismatch for bnlab's embedded CIFAR-10 sample {path}: SHA-256 {actual}, "
            f"expected {sha256}. The file is damaged: reinstall bnlab, or pass --data-dir"
        )
    arrays = _decoded_samples.get(actual)
    if arrays is None:  # decompressing takes about 1.5 s: the shipped asset is decoded once
        try:
            with np.load(io.BytesIO(lzma.decompress(payload)), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in _EMBEDDED_ARRAYS}
        except Exception as error:  # only reachable if the recorded checksum itself is wrong
            raise DataError(f"{path} is not a readable embedded sample: {error}") from error
        if actual == EMBEDDED_SAMPLE_SHA256:
            _decoded_samples[actual] = arrays
    arrays = {name: array.copy() for name, array in arrays.items()}  # each caller owns its data
    n, m = len(arrays["train_images"]), len(arrays["test_images"])
    return _dataset(
        (arrays["train_images"], arrays["train_labels"]),
        (arrays["test_images"], arrays["test_labels"]),
        f"CIFAR-10 embedded sample ({n} train / {m} test) — not the full data set",
    )


# ---------------------------------------------------------------------------------------------
# Resolution: data_dir, cache, download, embedded sample
# ---------------------------------------------------------------------------------------------


def load_cifar10(
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    timeout: float = 3.0,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
) -> CIFAR10:
    """Find CIFAR-10: ``data_dir``, else the cache, else a download, else the embedded sample.

    Args:
        data_dir: a folder holding ``cifar-10-batches-py/`` or that folder itself. When
            given it is the only place looked at: a DataError says what is wrong with it.
        cache_dir: where downloads go and are looked for; default :func:`default_cache_dir`.
        download: allow downloading the official release (163 MB) into ``cache_dir``.
        timeout: seconds the server has to answer before bnlab falls back to the sample.
        url, md5: the release to download (tests point these at a local server).

    Falling back to the embedded sample prints one line to stderr saying so and how to get
    the full set; ``source`` of the result names the data in every case.

        >>> ds = load_cifar10("~/data")                 # doctest: +SKIP
        >>> ds = load_cifar10(download=False)           # doctest: +SKIP
        bnlab: using the embedded CIFAR-10 sample (5085 train / 1017 test), ...
    """
    if data_dir is not None:
        return load_cifar10_dir(data_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if (cache / BATCHES_DIR).is_dir():
        try:
            return load_cifar10_dir(cache)
        except DataError as error:
            raise DataError(
                f"{error} (in the cache: delete {cache / BATCHES_DIR} to re-download)"
            ) from error
    if download:
        try:
            download_cifar10(cache, url=url, md5=md5, timeout=timeout)
            return load_cifar10_dir(cache)
        except DownloadError as error:
            reason = f"the download failed: {error}"
    else:
        reason = "downloading is turned off"
    sample = load_embedded_sample()
    print(
        f"bnlab: using the embedded CIFAR-10 sample ({sample.num_train} train / "
        f"{sample.num_test} test), not the full data set: no CIFAR-10 in {cache} and {reason}. "
        f"{_HOW_TO_GET_FULL}",
        file=sys.stderr,
    )
    return sample


# ---------------------------------------------------------------------------------------------
# Batching on the device, in tensor operations
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _normalize_constants(
    device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (1, 3, 1, 1) scale = 1 / (255 std) and shift = -mean / std.

    Then x_hat = pixel * scale + shift = (pixel / 255 - mean) / std.
    """
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
    shift = (-mean / std).view(1, 3, 1, 1)
    return scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype)


def normalize(
    images: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 pixels (N, 3, H, W) -> ``dtype`` (N, 3, H, W): ``(pixel / 255 - mean) / std``.

    ``mean`` and ``std`` are the CIFAR-10 training-set constants ``CIFAR10_MEAN``/``CIFAR10_STD``.
    Half-precision outputs are computed in float32 and rounded once.

        >>> x = normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        >>> round(x[0, 0, 0, 0].item(), 4)      # -mean_R / std_R
        -1.9892
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = _normalize_constants(images.device, compute)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return torch.addcmul(shift, images.to(compute), scale).to(dtype)


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """Random ``padding``-pixel crop and horizontal flip of each image, for the whole batch at once.

    Each (N, C, H, W) image is padded with ``padding`` zero pixels (black, as torchvision's
    ``RandomCrop(32, padding=4)`` pads before ``Normalize``), an H x W window at a random
    offset in 0..2*padding is taken, and the window is mirrored left-right with probability
    1/2. One ``gather`` does it all; the random numbers come from ``generator`` (on any
    device), so the result is reproducible from its seed.

        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop_flip(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), g).shape
        torch.Size([8, 3, 32, 32])
    """
    n, c, h, w = images.shape
    offsets = torch.randint(
        0, 2 * padding + 1, (2, n), generator=generator, device=generator.device
    )
    mirror = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    offsets, mirror = offsets.to(images.device), mirror.to(images.device)
    if not flip:
        mirror = torch.zeros_like(mirror)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    width = w + 2 * padding
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (N, H)
    columns = torch.arange(w, device=images.device).expand(n, w)
    columns = offsets[1, :, None] + torch.where(mirror[:, None], w - 1 - columns, columns)  # (N, W)
    index = (rows[:, :, None] * width + columns[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, index).view(n, c, h, w)


def train_batches(
    dataset: CIFAR10,
    batch_size: int,
    *,
    generator: torch.Generator,
    augment: bool = True,
    drop_last: bool = True,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    order: str = "shuffled",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches ``(images, labels)`` on the data set's device.

    images: ``dtype`` (B, 3, 32, 32), normalized (and cropped/flipped if ``augment``);
    labels: int64 (B,). The shuffle and the augmentation draw from ``generator``, so an epoch
    is reproducible from its seed; call again for the next epoch. There are
    ``N // batch_size`` batches with ``drop_last``, ``ceil(N / batch_size)`` without.

    ``order="class_sorted"`` makes batches that do not represent the data (the studies'
    Q3): the images are sorted by label (in random order within a class), cut into
    consecutive batches, and the batches are visited in random order, so each batch holds
    one class, or two where a class ends.

        >>> g = torch.Generator().manual_seed(0)
        >>> for images, labels in train_batches(ds.to("cuda"), 128, generator=g):  # doctest: +SKIP
        ...     loss = criterion(model(images), labels)
    """
    if not 1 <= batch_size <= dataset.num_train:
        raise ValueError(
            f"batch size {batch_size} is larger than the training set ({dataset.num_train} images "
            f"of {dataset.source}): use a batch size of at most {dataset.num_train} or more data"
            if batch_size > dataset.num_train
            else f"batch size must be at least 1, got {batch_size}"
        )

    if order not in ("shuffled", "class_sorted"):
        raise ValueError(f"order must be 'shuffled' or 'class_sorted', got {order!r}")

    def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = dataset.num_train
        perm = torch.randperm(n, generator=generator, device=generator.device).to(dataset.device)
        stop = n - n % batch_size if drop_last else n
        starts = list(range(0, stop, batch_size))
        if order == "class_sorted":  # stable sort of a random permutation by label
            perm = perm[torch.sort(dataset.train_labels[perm], stable=True).indices]
            visit = torch.randperm(len(starts), generator=generator, device=generator.device)
            starts = [starts[i] for i in visit.tolist()]
        for start in starts:
            index = perm[start : start + batch_size]
            images = dataset.train_images[index]
            if augment:
                images = random_crop_flip(images, generator)
            yield (
                normalize(images, dtype=dtype, channels_last=channels_last),
                dataset.train_labels[index],
            )

    return epoch()


def test_batches(
    dataset: CIFAR10,
    batch_size: int,
    *,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in its stored order, normalized, never augmented; the last batch may be short.

    >>> for images, labels in test_batches(ds, 1000):  # doctest: +SKIP
    ...     correct += (model(images).argmax(1) == labels).sum()
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, dataset.num_test, batch_size):
            images = dataset.test_images[start : start + batch_size]
            yield (
                normalize(images, dtype=dtype, channels_last=channels_last),
                dataset.test_labels[start : start + batch_size],
            )

    return batches()


test_batches.__test__ = False  # not a pytest test, though its name starts with "test_"
