"""What bnlab.data promises: CIFAR-10 read safely and exactly, found in the documented order,
downloaded without ever trusting a broken file, and batched on the device reproducibly.

Every test makes its own small files in the official format (tests/cifar_fixtures.py); only
the embedded-sample checks read real images, and the comparison with the shared sample
folder is skipped where that folder is absent.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab import data
from bnlab.data import CIFAR10, DataError, DownloadError

try:
    from cifar_fixtures import (
        batch_dict,
        closed_port_url,
        folder_archive,
        make_archive,
        md5,
        official_pickle,
        serve,
        write_cifar10_folder,
    )
except ImportError:  # tests/ imported as a package
    from tests.cifar_fixtures import (
        batch_dict,
        closed_port_url,
        folder_archive,
        make_archive,
        md5,
        official_pickle,
        serve,
        write_cifar10_folder,
    )

SAMPLE_DIR = Path(
    os.environ.get("BNLAB_SAMPLE_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-sample"
)
ACCEPTANCE_DIR = Path(__file__).resolve().parents[1].parent / "shared/acceptance"


def assert_same_data(ds: CIFAR10, arrays: dict[str, np.ndarray]) -> None:
    """``ds`` holds exactly ``arrays`` (from write_cifar10_folder), with the right dtypes."""
    for name, expected in arrays.items():
        tensor = getattr(ds, name)
        assert tensor.dtype == (torch.uint8 if name.endswith("images") else torch.int64), name
        np.testing.assert_array_equal(tensor.numpy(), expected, err_msg=name)


def no_leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` a broken download or extraction could have left behind."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# Reading the official format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
@pytest.mark.parametrize("point_at", ["parent", "batches folder"])
def test_reads_official_format(tmp_path: Path, numpy_module: str, point_at: str) -> None:
    arrays = write_cifar10_folder(tmp_path, per_batch=3, test=4, numpy_module=numpy_module)
    folder = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    ds = data.load_cifar10(folder, download=False)
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert_same_data(ds, arrays)
    assert ds.classes == data.CLASSES
    assert str(tmp_path / "cifar-10-batches-py") in ds.source
    assert "15 train / 4 test" in ds.source and "not the full data set" in ds.source
    assert not ds.is_full


def test_pixel_layout_is_red_plane_then_green_then_blue(tmp_path: Path) -> None:
    """A file row is 1024 R values (row-major 32x32), then 1024 G, then 1024 B."""
    rows = np.zeros((2, 3072), dtype=np.uint8)
    rows[1, 0 * 1024 + 5 * 32 + 7] = 200  # R at y=5, x=7
    rows[1, 1 * 1024 + 31 * 32 + 0] = 201  # G at y=31, x=0
    rows[1, 2 * 1024 + 0 * 32 + 31] = 202  # B at y=0, x=31
    batch = {b"data": rows, b"labels": [3, 4], b"batch_label": b"x", b"filenames": [b"a", b"b"]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(official_pickle(batch))
    images, labels = data.read_batch(path)
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [3, 4] and labels.dtype == np.int64
    assert (images[1, 0, 5, 7], images[1, 1, 31, 0], images[1, 2, 0, 31]) == (200, 201, 202)
    assert images.sum() == 200 + 201 + 202


def test_full_split_is_named_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10_folder(tmp_path, per_batch=2, test=3)
    monkeypatch.setattr(data, "FULL_TRAIN", 10)
    monkeypatch.setattr(data, "FULL_TEST", 3)
    ds = data.load_cifar10_dir(tmp_path)
    assert ds.source.startswith("CIFAR-10 (full: 10 train / 3 test) from ")
    assert ds.is_full


# ---------------------------------------------------------------------------------------------
# Clear errors, naming the file
# ---------------------------------------------------------------------------------------------


def _rewrite(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        batch = batch_dict(np.zeros((3, 3, 32, 32), np.uint8), np.array([1, 2, 3]), name)
        change(batch)
        (folder / name).write_bytes(official_pickle(batch))

    return damage


def _truncate(folder: Path) -> None:
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(folder: Path) -> None:
    (folder / "data_batch_4").write_bytes(b"\x80\x02}q\x00(\xff\xfe not a pickle at all")


ERROR_CASES = {
    # name: (damage the fixture folder, the file the message must name, words it must hold)
    "truncated": (_truncate, "data_batch_2", "truncated"),
    "corrupt": (_garble, "data_batch_4", "corrupt"),
    "missing batch": (lambda f: (f / "data_batch_3").unlink(), "data_batch_3", "missing"),
    "wrong row length": (
        _rewrite("data_batch_1", lambda b: b.update({b"data": np.zeros((3, 3071), np.uint8)})),
        "data_batch_1",
        "(N, 3072)",
    ),
    "float pixels": (
        _rewrite("data_batch_5", lambda b: b.update({b"data": np.zeros((3, 3072), np.float32)})),
        "data_batch_5",
        "uint8",
    ),
    "label out of range": (
        _rewrite("test_batch", lambda b: b.update({b"labels": [0, 10, 2]})),
        "test_batch",
        "out of range",
    ),
    "too few labels": (
        _rewrite("data_batch_1", lambda b: b.update({b"labels": [0, 1]})),
        "data_batch_1",
        "3 integers",
    ),
    "not a dict": (
        lambda f: (f / "data_batch_1").write_bytes(official_pickle([1, 2, 3])),
        "data_batch_1",
        "not a CIFAR-10 batch",
    ),
    "bad meta": (
        lambda f: (f / "batches.meta").write_bytes(official_pickle({b"label_names": [b"a"]})),
        "batches.meta",
        "10 names",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_damaged_folder_raises_naming_the_file(tmp_path: Path, case: str) -> None:
    damage, file_name, words = ERROR_CASES[case]
    write_cifar10_folder(tmp_path)
    damage(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError) as error:
        data.load_cifar10(tmp_path, download=False)
    print(error.value)
    assert file_name in str(error.value) and words in str(error.value)


def test_missing_data_dir_says_what_it_should_hold(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as error:
        data.load_cifar10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)
    assert "cifar-10-batches-py" in str(error.value) and "--data-dir" in str(error.value)


def test_data_dir_without_cifar10_says_what_it_should_hold(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"png")
    with pytest.raises(DataError, match="CIFAR-10 not found in") as error:
        data.load_cifar10(tmp_path / "photos")
    assert str(tmp_path / "photos") in str(error.value)
    assert "cifar-10-batches-py" in str(error.value) and "or that folder itself" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Safe unpickling: a malicious batch file runs no code
# ---------------------------------------------------------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


EVIL = {
    "os.system as data": lambda m: {b"data": _System(m), b"labels": [0]},
    "builtins.exec as data": lambda m: {b"data": _Exec(m), b"labels": [0]},
    "subprocess.Popen in labels": lambda m: {
        b"data": np.zeros((1, 3072), np.uint8),
        b"labels": [_Popen(m)],
    },
    "os.system at top level": lambda m: _System(m),
}


@pytest.mark.parametrize("payload", EVIL)
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_runs_nothing(
    tmp_path: Path, payload: str, protocol: int
) -> None:
    write_cifar10_folder(tmp_path / "data")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    evil.write_bytes(pickle.dumps(EVIL[payload](marker), protocol=protocol))
    with pytest.raises(DataError) as error:
        data.load_cifar10(tmp_path / "data", download=False)
    print(error.value)
    assert not marker.exists(), "the malicious pickle ran code"
    assert str(evil) in str(error.value)
    assert "not a CIFAR-10 batch file" in str(error.value) and "refuses" in str(error.value)
    if payload == "os.system at top level":  # the first global it asks for is the dangerous one
        assert f"'{os.system.__module__}.system'" in str(error.value)


def test_refuses_numpy_globals_that_are_not_array_reconstruction(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02cnumpy\nload\nX\x0a\x00\x00\x00/etc/hostsq\x00\x85R.")
    with pytest.raises(DataError, match=r"'numpy\.load'"):
        data.read_batch(path)


@pytest.mark.skipif(
    not (ACCEPTANCE_DIR / "make_evil_data.py").exists() or not SAMPLE_DIR.exists(),
    reason="needs ../shared/acceptance and the CIFAR-10 sample",
)
def test_acceptance_evil_folder_is_refused(tmp_path: Path) -> None:
    """The exact folder ../shared/acceptance/safe-unpickle.sh builds."""
    marker = tmp_path / "PWNED"
    subprocess.run(
        [
            sys.executable,
            ACCEPTANCE_DIR / "make_evil_data.py",
            SAMPLE_DIR,
            tmp_path / "data",
            marker,
        ],
        check=True,
    )
    with pytest.raises(DataError, match="data_batch_1") as error:
        data.load_cifar10(tmp_path / "data")
    print(error.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Download against a local HTTP server
# ---------------------------------------------------------------------------------------------


def test_download_verifies_extracts_and_loads(tmp_path: Path) -> None:
    arrays = write_cifar10_folder(tmp_path / "src")
    archive = folder_archive(tmp_path / "src")
    dest = tmp_path / "cache"
    with serve({"/c.tar.gz": archive}) as base:
        folder = data.download_cifar10(dest, url=f"{base}/c.tar.gz", md5=md5(archive), quiet=True)
    assert folder == dest / "cifar-10-batches-py"
    assert no_leftovers(dest) == ["cifar-10-batches-py"]  # archive deleted, no temporary files
    assert_same_data(data.load_cifar10_dir(dest), arrays)


def test_checksum_mismatch_keeps_nothing(tmp_path: Path) -> None:
    write_cifar10_folder(tmp_path / "src")
    archive = folder_archive(tmp_path / "src")
    dest = tmp_path / "cache"
    with serve({"/c.tar.gz": archive}) as base:
        with pytest.raises(DownloadError, match="checksum mismatch") as error:
            data.download_cifar10(dest, url=f"{base}/c.tar.gz", md5="0" * 32, quiet=True)
        print(error.value)
        assert no_leftovers(dest) == []
        # the next run starts afresh and succeeds
        data.download_cifar10(dest, url=f"{base}/c.tar.gz", md5=md5(archive), quiet=True)
    assert no_leftovers(dest) == ["cifar-10-batches-py"]


def test_dropped_connection_keeps_nothing(tmp_path: Path) -> None:
    write_cifar10_folder(tmp_path / "src")
    archive = folder_archive(tmp_path / "src")
    dest = tmp_path / "cache"
    cut = serve({"/c.tar.gz": archive}, cut_after=len(archive) // 2)
    with cut as base, pytest.raises(DownloadError) as error:
        data.download_cifar10(dest, url=f"{base}/c.tar.gz", md5=md5(archive), quiet=True)
    print(error.value)
    assert "nothing was kept" in str(error.value)
    assert no_leftovers(dest) == []
    with serve({"/c.tar.gz": archive}) as base:
        data.download_cifar10(dest, url=f"{base}/c.tar.gz", md5=md5(archive), quiet=True)
    data.load_cifar10_dir(dest)


def test_unanswered_or_failing_server_is_a_download_error(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="no answer"):
        data.download_cifar10(tmp_path, url=closed_port_url(), timeout=1.0, quiet=True)
    assert time.perf_counter() - start < 2.0
    with serve({}) as base, pytest.raises(DownloadError, match="404"):
        data.download_cifar10(tmp_path, url=f"{base}/missing.tar.gz", quiet=True)
    assert no_leftovers(tmp_path) == []


def test_archive_already_in_folder_is_verified_then_used(tmp_path: Path) -> None:
    arrays = write_cifar10_folder(tmp_path / "src")
    archive = folder_archive(tmp_path / "src")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / data.ARCHIVE_NAME).write_bytes(archive[:-10] + b"0123456789")
    with pytest.raises(DataError, match="checksum mismatch") as error:
        data.download_cifar10(dest, url=closed_port_url(), md5=md5(archive), quiet=True)
    assert str(dest / data.ARCHIVE_NAME) in str(error.value)
    (dest / data.ARCHIVE_NAME).write_bytes(archive)
    data.download_cifar10(dest, url=closed_port_url(), md5=md5(archive), quiet=True)
    assert_same_data(data.load_cifar10_dir(dest), arrays)


def _hostile_archives(tmp_path: Path) -> dict[str, bytes]:
    """Archives that pass the checksum (the test gives their MD5) but must not be extracted."""
    good = {f"cifar-10-batches-py/{n}": b"x" * 10 for n in (*data.TRAIN_FILES, "test_batch")}
    folder = "cifar-10-batches-py"
    return {
        "parent traversal": make_archive({**good, f"{folder}/../../evil": b"pwned"}),
        "leading ..": make_archive({"../evil": b"pwned", **good}),
        "absolute path": make_archive({**good, str(tmp_path / "evil"): b"pwned"}),
        "symlink": make_archive({**good, f"{folder}/link": (tarfile.SYMTYPE, "/etc")}),
        "write through a symlink": make_archive(
            {f"{folder}/up": (tarfile.SYMTYPE, str(tmp_path)), f"{folder}/up/evil": b"pwned"}
        ),
        "hard link": make_archive({**good, f"{folder}/hl": (tarfile.LNKTYPE, "/etc/passwd")}),
        "device": make_archive({**good, f"{folder}/dev": (tarfile.CHRTYPE, "")}),
        "outside the folder": make_archive({**good, "evil": b"pwned"}),
    }


HOSTILE = [
    "parent traversal",
    "leading ..",
    "absolute path",
    "symlink",
    "write through a symlink",
    "hard link",
    "device",
    "outside the folder",
]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_archive_is_refused_and_writes_nothing_outside(tmp_path: Path, case: str) -> None:
    archive = _hostile_archives(tmp_path)[case]
    dest = tmp_path / "a" / "b"
    with serve({"/c.tar.gz": archive}) as base, pytest.raises(DataError, match="unsafe") as error:
        data.download_cifar10(dest, url=f"{base}/c.tar.gz", md5=md5(archive), quiet=True)
    print(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no evil, no link
    assert no_leftovers(tmp_path / "a") == ["b"] and no_leftovers(dest) == []


# ---------------------------------------------------------------------------------------------
# The embedded sample
# ---------------------------------------------------------------------------------------------


def test_embedded_sample_loads_verified() -> None:
    ds = data.load_embedded_sample()
    assert ds.train_images.shape == (5085, 3, 32, 32) and ds.test_images.shape == (1017, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.source == "CIFAR-10 embedded sample (5085 train / 1017 test) — not the full data set"
    counts = torch.bincount(ds.train_labels, minlength=10)
    print("train images per class:", counts.tolist())
    assert counts.min() > 400 and counts.max() < 600  # about 500 each: real, balanced labels
    assert ds.train_images.float().std() > 40  # real images, not blanks


def test_embedded_sample_corrupted_copy_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "cifar10_sample.npz.xz"
    payload = bytearray(data.EMBEDDED_SAMPLE_PATH.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    copy.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="checksum mismatch") as error:
        data.load_embedded_sample(copy)
    print(error.value)
    assert str(copy) in str(error.value) and "reinstall bnlab" in str(error.value)


@pytest.mark.skipif(not SAMPLE_DIR.exists(), reason=f"no CIFAR-10 sample folder at {SAMPLE_DIR}")
def test_embedded_sample_equals_the_sample_folder() -> None:
    embedded = data.load_embedded_sample()
    folder = data.load_cifar10_dir(SAMPLE_DIR)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(embedded, name), getattr(folder, name)), name


def test_embedded_format_round_trips_bit_for_bit(tmp_path: Path) -> None:
    write_cifar10_folder(tmp_path / "src", per_batch=2, test=3)
    ds = data.load_cifar10_dir(tmp_path / "src")
    first = data.write_embedded_sample(ds, tmp_path / "a.npz.xz")
    second = data.write_embedded_sample(ds, tmp_path / "b.npz.xz")
    assert first == second  # deterministic: the recorded SHA-256 can be rebuilt
    back = data.load_embedded_sample(tmp_path / "a.npz.xz", sha256=first)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(back, name), getattr(ds, name)), name


# ---------------------------------------------------------------------------------------------
# Resolution order: data_dir, cache, download, embedded sample
# ---------------------------------------------------------------------------------------------


def test_explicit_data_dir_wins_over_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_cifar10_folder(tmp_path / "cache", seed=1)
    mine = write_cifar10_folder(tmp_path / "mine", seed=2)
    ds = data.load_cifar10(tmp_path / "mine", cache_dir=tmp_path / "cache", url=closed_port_url())
    assert_same_data(ds, mine)
    assert str(tmp_path / "mine") in ds.source and capsys.readouterr().err == ""


def test_unusable_data_dir_never_falls_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_cifar10_folder(tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        data.load_cifar10(tmp_path / "empty", cache_dir=tmp_path / "cache")
    assert "embedded" not in capsys.readouterr().err


def test_cache_is_used_when_it_holds_cifar10(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cached = write_cifar10_folder(tmp_path / "cache")
    ds = data.load_cifar10(cache_dir=tmp_path / "cache", url=closed_port_url())
    assert_same_data(ds, cached)
    assert capsys.readouterr().err == ""


def test_cache_dir_comes_from_bnlab_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = write_cifar10_folder(tmp_path / "env-cache")
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "env-cache"))
    assert data.default_cache_dir() == tmp_path / "env-cache"
    assert_same_data(data.load_cifar10(url=closed_port_url()), cached)
    monkeypatch.delenv("BNLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "bnlab"


def test_damaged_cache_is_an_error_naming_it(tmp_path: Path) -> None:
    write_cifar10_folder(tmp_path / "cache")
    _truncate(tmp_path / "cache" / "cifar-10-batches-py")
    with pytest.raises(DataError, match=r"data_batch_2.*delete") as error:
        data.load_cifar10(cache_dir=tmp_path / "cache", download=False)
    print(error.value)


def test_empty_cache_downloads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    arrays = write_cifar10_folder(tmp_path / "src")
    archive = folder_archive(tmp_path / "src")
    with serve({"/c.tar.gz": archive}) as base:
        ds = data.load_cifar10(
            cache_dir=tmp_path / "cache", url=f"{base}/c.tar.gz", md5=md5(archive)
        )
    assert_same_data(ds, arrays)
    assert (tmp_path / "cache" / "cifar-10-batches-py").is_dir()
    assert "downloading" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["no network", "download off"])
def test_offline_falls_back_to_embedded_sample_with_notice(
    tmp_path: Path, capsys: pytest.CaptureFixture, how: str
) -> None:
    start = time.perf_counter()
    ds = data.load_cifar10(
        cache_dir=tmp_path / "cache", download=how == "no network", url=closed_port_url()
    )
    assert time.perf_counter() - start < 10
    assert ds.num_train == 5085 and "embedded sample" in ds.source
    notice = capsys.readouterr().err
    print(notice)
    assert notice.count("\n") == 1 and "embedded CIFAR-10 sample" in notice
    assert "--data-dir" in notice and "download" in notice
    assert ("no answer" if how == "no network" else "turned off") in notice
    assert not (tmp_path / "cache").exists()  # nothing created when nothing was downloaded


def test_bad_download_falls_back_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_cifar10_folder(tmp_path / "src")
    archive = folder_archive(tmp_path / "src")
    with serve({"/c.tar.gz": archive}) as base:
        ds = data.load_cifar10(cache_dir=tmp_path / "cache", url=f"{base}/c.tar.gz", md5="0" * 32)
    assert "embedded sample" in ds.source
    assert "checksum mismatch" in capsys.readouterr().err
    assert no_leftovers(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------------
# The data set object
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> CIFAR10:
    """20 train / 7 test random images; train label i identifies image i (not a class)."""
    write_cifar10_folder(tmp_path, per_batch=4, test=7)
    ds = data.load_cifar10_dir(tmp_path)
    return dataclasses.replace(ds, train_labels=torch.arange(ds.num_train))


def test_class_sorted_batches_hold_one_class_each(tmp_path: Path) -> None:
    write_cifar10_folder(tmp_path, per_batch=20, test=5)  # 100 images, random labels
    ds = data.load_cifar10_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(ds, 10, generator=g, augment=False,
                                      order="class_sorted"))
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(ds.train_labels.tolist())  # each image once
    # a sorted order cut into batches of 10: at most (number of classes) batches straddle
    mixed = sum(len(set(y.tolist())) > 1 for _, y in batches)
    assert mixed <= len(set(ds.train_labels.tolist())) - 1
    shuffled = data.train_batches(ds, 10, generator=g, augment=False)
    assert sum(len(set(y.tolist())) > 1 for _, y in shuffled) > mixed
    firsts = [int(y[0]) for _, y in batches]
    assert firsts != sorted(firsts)  # the batches are visited in random order
    with pytest.raises(ValueError, match="order"):
        data.train_batches(ds, 10, generator=g, order="by_colour")


def test_subset_is_seeded_and_named(small: CIFAR10) -> None:
    sub = small.subset(8, seed=3)
    assert sub.num_train == 8 and sub.num_test == small.num_test
    assert torch.equal(sub.train_images, small.train_images[sub.train_labels])
    assert len(set(sub.train_labels.tolist())) == 8
    assert torch.equal(small.subset(8, seed=3).train_labels, sub.train_labels)
    assert not torch.equal(small.subset(8, seed=4).train_labels, sub.train_labels)
    assert sub.source == small.source + "; subset of 8 train images (seed 3)"
    with pytest.raises(ValueError, match=r"outside 1\.\.20"):
        small.subset(21)


def test_to_moves_the_tensors(small: CIFAR10) -> None:
    moved = small.to("meta")
    assert {t.device.type for t in (moved.train_images, moved.test_labels)} == {"meta"}
    assert moved.train_images.dtype == torch.uint8 and moved.source == small.source


def test_dataset_checks_its_tensors(small: CIFAR10) -> None:
    with pytest.raises(ValueError, match="uint8"):
        dataclasses.replace(small, train_images=small.train_images.float())
    with pytest.raises(ValueError, match="train_labels"):
        dataclasses.replace(small, train_labels=small.train_labels[:-1])


# ---------------------------------------------------------------------------------------------
# Batching on the device
# ---------------------------------------------------------------------------------------------


def test_normalize_matches_float64_reference() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(data.CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    reference = (images.double() / 255 - mean) / std
    out = data.normalize(images)
    error = (out.double() - reference).abs().max().item()
    print(
        f"normalize: {out.flatten()[:3].tolist()} vs {reference.flatten()[:3].tolist()}, "
        f"max abs err {error:.2e}"
    )
    assert (
        out.dtype == torch.float32 and error < 1e-5
    )  # |x_hat| < 2.2, float32 rounding ~ 1e-7 each
    assert torch.allclose(
        data.normalize(images, dtype=torch.float64), reference, rtol=0, atol=1e-12
    )
    assert data.normalize(images, dtype=torch.bfloat16).dtype == torch.bfloat16
    last = data.normalize(images, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)


def test_normalized_sample_has_zero_mean_unit_std() -> None:
    x = data.normalize(data.load_embedded_sample().train_images)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    print("per-channel mean", mean.tolist(), "std", std.tolist())
    assert mean.abs().max() < 0.05 and (std - 1).abs().max() < 0.05


def test_train_batches_shapes_and_count(small: CIFAR10) -> None:
    g = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(small, 6, generator=g))
    assert len(batches) == 3  # 20 // 6, the short batch dropped
    images, labels = batches[0]
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (6,) and labels.dtype == torch.int64
    sizes = [len(y) for _, y in data.train_batches(small, 6, generator=g, drop_last=False)]
    assert sizes == [6, 6, 6, 2]
    images, _ = next(
        data.train_batches(small, 6, generator=g, dtype=torch.float16, channels_last=True)
    )
    assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)


def test_shuffle_is_a_seeded_permutation(small: CIFAR10) -> None:
    def epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        batches = list(data.train_batches(small, 5, generator=g, augment=False, drop_last=False))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    images, order = epoch(0)
    assert sorted(order.tolist()) == list(range(20)) and order.tolist() != list(range(20))
    assert torch.equal(images, data.normalize(small.train_images[order]))  # images follow labels
    assert torch.equal(epoch(0)[1], order) and not torch.equal(epoch(1)[1], order)


def _crop_candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop and mirrored crop of one (3, 32, 32) image, by a plain per-image reference."""
    padded = torch.zeros(3, 32 + 2 * padding, 32 + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + 32, padding : padding + 32] = image
    crops = [
        padded[:, dy : dy + 32, dx : dx + 32]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]
    return crops + [crop.flip(-1) for crop in crops]


def test_augmentation_is_crop_and_flip_reproducible_and_changes_images(small: CIFAR10) -> None:
    images = small.train_images
    out = data.random_crop_flip(images, torch.Generator().manual_seed(5))
    again = data.random_crop_flip(images, torch.Generator().manual_seed(5))
    other = data.random_crop_flip(images, torch.Generator().manual_seed(6))
    assert torch.equal(out, again) and not torch.equal(out, other)
    kinds = []
    for source, result in zip(images, out, strict=True):
        matches = [i for i, c in enumerate(_crop_candidates(source, 4)) if torch.equal(c, result)]
        assert matches, "an augmented image is not a 4-pixel crop (or its mirror) of its source"
        kinds.append(matches[0])
    print("candidate index per image (40 = centre, >= 81 mirrored):", kinds)
    assert any(k >= 81 for k in kinds) and any(k < 81 for k in kinds)  # some flipped, some not
    assert len({k % 81 for k in kinds}) > 5 and not torch.equal(out, images)  # offsets vary


def test_flip_only_and_crop_only(small: CIFAR10) -> None:
    images = small.train_images
    flipped = data.random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert ((flipped == images).flatten(1).all(1) | mirrored).all() and 0 < mirrored.sum() < 20
    cropped = data.random_crop_flip(images, torch.Generator().manual_seed(0), flip=False)
    for source, result in zip(images, cropped, strict=True):
        assert any(torch.equal(c, result) for c in _crop_candidates(source, 4)[:81])


def test_train_batches_augment_reproducibly_test_batches_never(small: CIFAR10) -> None:
    def first(seed: int, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return next(data.train_batches(small, 20, generator=g, augment=augment))

    (a, ya), (b, yb) = first(0, True), first(0, True)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    plain, _ = first(0, False)
    assert not torch.equal(a, plain)  # same shuffle, augmentation changed the pixels
    tested = list(data.test_batches(small, 3))
    assert [len(y) for _, y in tested] == [3, 3, 1]
    assert torch.equal(torch.cat([x for x, _ in tested]), data.normalize(small.test_images))
    assert torch.equal(torch.cat([y for _, y in tested]), small.test_labels)


def test_batch_size_larger_than_training_set_is_refused_at_once(small: CIFAR10) -> None:
    with pytest.raises(ValueError, match="batch size 21 is larger than the training set"):
        data.train_batches(small, 21, generator=torch.Generator())
    with pytest.raises(ValueError, match="at least 1"):
        data.test_batches(small, 0)
