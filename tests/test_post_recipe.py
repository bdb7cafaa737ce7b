"""What bnlab.post.recipe and bnlab.post.log promise: the post's data recipe and its logged numbers.

Batches are built from small random data sets whose train label i names image i, so every
image of a batch can be traced back to its source; the raw (unstandardised) batch is read by
replacing ``standardize_per_pixel`` with the identity, and the probability of the affine
steps is set by wrapping ``post_augment``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bnlab.data import CIFAR10
from bnlab.post import recipe as post_recipe
from bnlab.post.log import LOGGED_FINAL, load_logged_metrics
from bnlab.post.recipe import (
    AUGMENT_PROBABILITY,
    ROTATE,
    SCALE,
    STANDARDIZE_EPS,
    TRANSLATE,
    post_affine,
    post_augment,
    post_steps_per_epoch,
    post_test_batches,
    post_train_batches,
    standardize_per_pixel,
)

SHARED_METRICS = Path(__file__).resolve().parents[1].parent / "shared/post/logged-metrics.csv"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Single-threaded: these tensors are tiny, and on a busy shared machine a thread pool's
    barrier can stall for longer than the work takes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_dataset(num_train: int = 20, num_test: int = 7, seed: int = 0) -> CIFAR10:
    """Random uint8 images; train label i identifies image i (not a class)."""
    g = torch.Generator().manual_seed(seed)
    return CIFAR10(
        train_images=torch.randint(0, 256, (num_train, 3, 32, 32), generator=g, dtype=torch.uint8),
        train_labels=torch.arange(num_train),
        test_images=torch.randint(0, 256, (num_test, 3, 32, 32), generator=g, dtype=torch.uint8),
        test_labels=torch.arange(num_test) % 10,
        source="random test data",
    )


def raw_epoch(
    monkeypatch: pytest.MonkeyPatch, ds: CIFAR10, batch_size: int, seed: int, probability: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of batches before standardisation, affine steps drawn at ``probability``."""
    monkeypatch.setattr(post_recipe, "standardize_per_pixel", lambda x: x)
    monkeypatch.setattr(
        post_recipe, "post_augment", functools.partial(post_augment, probability=probability)
    )
    g = torch.Generator().manual_seed(seed)
    return list(post_train_batches(ds, batch_size, generator=g))


def split_pairs(
    ds: CIFAR10, images: torch.Tensor, labels: torch.Tensor
) -> tuple[list[int], list[torch.Tensor]]:
    """Check a raw batch holds B/2 originals, each twice, once exactly as stored; return the
    ids and, per id, the other image (the copy)."""
    ids, counts = labels.unique(return_counts=True)
    assert counts.eq(2).all(), f"every label must appear twice, got counts {counts.tolist()}"
    copies = []
    for i in ids.tolist():
        positions = (labels == i).nonzero().flatten().tolist()
        original = ds.train_images[i].float()
        exact = [p for p in positions if torch.equal(images[p], original)]
        assert len(exact) >= 1, f"image {i} is not in its batch as stored"
        copies.append(images[positions[1] if exact[0] == positions[0] else positions[0]])
    return ids.tolist(), copies


def is_exact_flip(copy: torch.Tensor, original: torch.Tensor) -> bool:
    return torch.equal(copy, original.flip(-1).float())


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    """(x, y) in pixels of a (H, W) image, relative to the centre ((W - 1)/2, (H - 1)/2)."""
    h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=image.dtype), torch.arange(w, dtype=image.dtype), indexing="ij"
    )
    mass = image.sum()
    return ((image * xs).sum() / mass - (w - 1) / 2).item(), (
        (image * ys).sum() / mass - (h - 1) / 2
    ).item()


def blob(sigma: float = 2.0, size: int = 32) -> torch.Tensor:
    """(1, 3, size, size) float64 Gaussian blob centred in the image."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g.expand(1, 3, size, size).clone()


def params(n: int = 1, translate=(0.0, 0.0), angle=0.0, scale=(1.0, 1.0)):
    """post_affine's (translate (N, 2), angle (N,), scale (N, 2)) for n identical images."""
    return (
        torch.tensor([translate], dtype=torch.float64).expand(n, 2),
        torch.full((n,), angle, dtype=torch.float64),
        torch.tensor([scale], dtype=torch.float64).expand(n, 2),
    )


def only(step: int, n: int = 1) -> torch.Tensor:
    """An ``apply`` mask selecting one step for all n images."""
    mask = torch.zeros(n, 3, dtype=torch.bool)
    mask[:, step] = True
    return mask


# ---------------------------------------------------------------------------------------------
# The batch: originals, copies, labels
# ---------------------------------------------------------------------------------------------


def test_batch_is_originals_plus_mirrored_copies_when_no_affine_is_drawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = random_dataset(40)
    for images, labels in raw_epoch(monkeypatch, ds, 10, seed=0, probability=0.0):
        assert images.shape == (10, 3, 32, 32) and labels.shape == (10,)
        ids, copies = split_pairs(ds, images, labels)
        assert len(ids) == 5
        for i, copy in zip(ids, copies, strict=True):
            assert is_exact_flip(copy, ds.train_images[i])
    # shuffled together: the copies do not simply follow the originals in the same order
    orders = [labels.tolist() for _, labels in raw_epoch(monkeypatch, ds, 10, 0, 0.0)]
    assert any(order[:5] != order[5:] for order in orders)


def test_default_probability_leaves_most_copies_exact_mirrors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = random_dataset(300)
    exact = total = 0
    for images, labels in raw_epoch(monkeypatch, ds, 50, seed=1, probability=AUGMENT_PROBABILITY):
        ids, copies = split_pairs(ds, images, labels)
        exact += sum(is_exact_flip(c, ds.train_images[i]) for i, c in zip(ids, copies, strict=True))
        total += len(ids)
    expected = (1 - AUGMENT_PROBABILITY) ** 3  # no step drawn: 0.729
    sd = math.sqrt(expected * (1 - expected) / total)
    print(f"exact mirror copies {exact}/{total} = {exact / total:.3f}, expected {expected:.3f}")
    assert total == 300 and abs(exact / total - expected) < 4 * sd


def test_probability_one_transforms_every_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = random_dataset(40)
    for images, labels in raw_epoch(monkeypatch, ds, 20, seed=2, probability=1.0):
        ids, copies = split_pairs(ds, images, labels)
        for i, copy in zip(ids, copies, strict=True):
            difference = (copy - ds.train_images[i].flip(-1).float()).abs().mean().item()
            assert difference > 1.0, f"copy of image {i} is (nearly) a plain mirror image"


def test_each_image_is_an_original_exactly_once_per_epoch() -> None:
    ds = random_dataset(20)
    for batch_size, steps in ((8, 5), (6, 6), (40, 1), (2, 20)):
        g = torch.Generator().manual_seed(3)
        batches = list(post_train_batches(ds, batch_size, generator=g))
        assert len(batches) == steps == post_steps_per_epoch(20, batch_size)
        labels = torch.cat([y for _, y in batches])
        counts = torch.bincount(labels, minlength=20)
        used = steps * batch_size // 2
        assert counts.eq(2).sum() == used and counts.eq(0).sum() == 20 - used  # partial dropped
    assert post_steps_per_epoch(50_000, 50) == 2000


@pytest.mark.parametrize("batch_size", [51, 7, 1, 0, -2])
def test_odd_or_tiny_batch_size_is_refused_at_the_call(batch_size: int) -> None:
    with pytest.raises(ValueError, match="must be even and at least 2"):
        post_train_batches(random_dataset(), batch_size, generator=torch.Generator())
    with pytest.raises(ValueError, match="must be even"):
        post_steps_per_epoch(20, batch_size)


def test_batch_larger_than_twice_the_training_set_is_refused() -> None:
    with pytest.raises(ValueError, match=r"batch size 42 .* at most 40"):
        post_train_batches(random_dataset(), 42, generator=torch.Generator())
    with pytest.raises(ValueError, match="at most 40"):
        post_steps_per_epoch(20, 42)
    assert len(list(post_train_batches(random_dataset(), 40, generator=torch.Generator()))) == 1


def test_epoch_is_reproducible_from_the_seed() -> None:
    ds = random_dataset(30)

    def epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        batches = list(post_train_batches(ds, 10, generator=g))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    (a, ya), (b, yb), (c, yc) = epoch(0), epoch(0), epoch(1)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Standardisation
# ---------------------------------------------------------------------------------------------


def test_training_batch_is_standardised_per_pixel_over_the_batch() -> None:
    ds = random_dataset(60)
    g = torch.Generator().manual_seed(4)
    for images, _ in post_train_batches(ds, 50, generator=g):
        std, mean = torch.std_mean(images.double(), dim=0, correction=0)
        print(
            f"largest |mean| {mean.abs().max():.2e}, largest |std - 1| {(std - 1).abs().max():.2e}"
        )
        assert mean.shape == (3, 32, 32)
        assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-5


def test_training_batch_standardisation_matches_the_raw_batch_in_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same seed, same draws: the standardised batch is the float64 standardisation of the raw."""
    ds = random_dataset(40)
    g = torch.Generator().manual_seed(5)
    standardised = list(post_train_batches(ds, 20, generator=g))
    raw = raw_epoch(monkeypatch, ds, 20, seed=5, probability=AUGMENT_PROBABILITY)
    for (z, labels), (x, raw_labels) in zip(standardised, raw, strict=True):
        assert torch.equal(labels, raw_labels)
        x = x.double()
        expected = (x - x.mean(0)) / x.std(0, correction=0)  # the post's formula, no eps
        error = (z.double() - expected).abs().max().item()
        print(f"largest abs error vs float64 reference: {error:.2e}")
        assert error < 1e-5  # float32: a few ulps of values of size <= sqrt(B)


def test_standardize_per_pixel_matches_reference_and_guards_constant_pixels() -> None:
    x = torch.rand(50, 3, 4, 4, dtype=torch.float64) * 255
    expected = (x - x.mean(0)) / (x.std(0, correction=0) + STANDARDIZE_EPS)
    assert torch.allclose(standardize_per_pixel(x), expected, rtol=0, atol=1e-12)
    wide = (x - x.mean(0)) / (x.std(0, correction=0) + 10.0)  # eps is added to the std
    assert torch.allclose(standardize_per_pixel(x, eps=10.0), wide, rtol=0, atol=1e-12)
    z32 = standardize_per_pixel(x.float())
    assert z32.dtype == torch.float32 and (z32.double() - expected).abs().max() < 1e-5
    z16 = standardize_per_pixel(x.half())
    assert z16.dtype == torch.float16
    x[:, 0, 0, 0] = 7.0  # constant over the batch
    assert standardize_per_pixel(x)[:, 0, 0, 0].eq(0).all()
    assert standardize_per_pixel(x, eps=0.0)[:, 0, 0, 0].isnan().all()  # the post's NaN
    with pytest.raises(ValueError, match="expected float"):
        standardize_per_pixel(torch.zeros(2, 3, dtype=torch.uint8))


def test_test_set_is_standardised_with_the_whole_test_set_statistics() -> None:
    ds = random_dataset(num_test=23)
    batches = list(post_test_batches(ds, 10))
    assert [len(y) for _, y in batches] == [10, 10, 3]
    images = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), ds.test_labels)  # stored order
    x = ds.test_images.double()
    expected = (x - x.mean(0)) / (x.std(0, correction=0) + STANDARDIZE_EPS)
    error = (images.double() - expected).abs().max().item()
    print(f"largest abs error vs float64 reference: {error:.2e}")
    assert images.dtype == torch.float32 and error < 1e-5
    first = batches[0][0]  # one batch alone is not standardised with its own statistics
    assert first.mean(0).abs().max() > 0.1
    with pytest.raises(ValueError, match="at least 1"):
        post_test_batches(ds, 0)


# ---------------------------------------------------------------------------------------------
# Memory format, dtype, devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_and_dtype(dtype: torch.dtype, channels_last: bool) -> None:
    ds = random_dataset(20)
    options = {"channels_last": channels_last, "dtype": dtype}
    g = torch.Generator().manual_seed(6)
    train, _ = next(post_train_batches(ds, 10, generator=g, **options))
    test, _ = next(post_test_batches(ds, 5, **options))
    g = torch.Generator().manual_seed(6)
    reference, _ = next(post_train_batches(ds, 10, generator=g))
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    for images in (train, test):
        assert images.dtype == dtype and images.shape[1:] == (3, 32, 32)
        assert images.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    assert torch.allclose(train.float(), reference, rtol=tolerance, atol=tolerance)


def test_every_draw_comes_from_the_generator_on_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU-only check: every torch.rand/randperm call names the generator and its device."""
    g = torch.Generator().manual_seed(7)
    calls = []

    def spy(function):
        def wrapped(*args, **kwargs):
            calls.append(function.__name__)
            assert kwargs.get("generator") is g, f"{function.__name__} without the generator"
            assert torch.device(kwargs.get("device")) == g.device, (
                "draw not on the generator's device"
            )
            return function(*args, **kwargs)

        return wrapped

    ds = random_dataset(20)
    for name in ("rand", "randperm", "randint", "randn", "bernoulli", "multinomial"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name)))
    batches = list(post_train_batches(ds, 10, generator=g))
    monkeypatch.undo()
    assert len(batches) == 4
    print("draws:", calls)
    assert calls.count("randperm") == 1 + 4 and calls.count("rand") == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_and_data_on_different_devices() -> None:
    for data_device, generator_device in (("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")):
        ds = random_dataset(20).to(data_device)
        g = torch.Generator(device=generator_device).manual_seed(8)
        images, labels = next(post_train_batches(ds, 10, generator=g))
        assert images.device.type == data_device and labels.device.type == data_device
        g = torch.Generator(device=generator_device).manual_seed(8)
        again, _ = next(post_train_batches(ds, 10, generator=g))
        assert torch.equal(images, again)


# ---------------------------------------------------------------------------------------------
# The augmentation itself
# ---------------------------------------------------------------------------------------------


def test_augment_with_probability_zero_is_the_exact_mirror() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(9)
    out = post_augment(images, g, probability=0.0)
    assert out.dtype == torch.float32 and torch.equal(out, images.flip(-1).float())
    out64 = post_augment(images.double(), g, probability=0.0)
    assert out64.dtype == torch.float64 and torch.equal(out64, images.flip(-1).double())


def test_augment_draws_each_step_with_its_probability() -> None:
    images = torch.randint(0, 256, (4000, 3, 8, 8), dtype=torch.uint8)
    mirror = images.flip(-1).float()
    for probability, expected in ((AUGMENT_PROBABILITY, 0.9**3), (0.5, 0.125), (1.0, 0.0)):
        out = post_augment(images, torch.Generator().manual_seed(10), probability=probability)
        untouched = (out == mirror).flatten(1).all(1).float().mean().item()
        sd = math.sqrt(expected * (1 - expected) / 4000)
        print(f"p={probability}: untouched {untouched:.3f}, expected {expected:.3f}")
        assert abs(untouched - expected) <= 4 * sd + 1e-9
    assert out.ge(0).all() and out.le(255).all()  # bilinear with black fill stays in range


def test_rotation_by_90_degrees_is_a_clockwise_quarter_turn() -> None:
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 255
    out = post_affine(x, *params(3, angle=90.0), apply=only(ROTATE, 3))
    error = (out - torch.rot90(x, -1, dims=(-2, -1))).abs().max().item()
    print(f"largest abs error vs rot90: {error:.2e}")
    assert error < 1e-9  # float64: only the rounding of cos(90 deg)


def test_rotation_by_30_degrees_turns_a_centred_square_about_the_centre() -> None:
    """Pixels well inside the rotated square are 1, well outside are 0; it stays centred."""
    x = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    x[..., 12:20, 12:20] = 1  # centred 8 x 8 square: edges at +-4 pixels from the centre
    angle = 30.0
    out = post_affine(x, *params(angle=angle), apply=only(ROTATE))[0, 0]
    r = torch.arange(32, dtype=torch.float64) - 15.5
    px, py = r[None, :].expand(32, 32), r[:, None].expand(32, 32)
    a = math.radians(angle)  # where each output pixel comes from: R^-1 p
    qx, qy = math.cos(a) * px + math.sin(a) * py, -math.sin(a) * px + math.cos(a) * py
    margin = 4 - torch.maximum(qx.abs(), qy.abs())  # > 0 inside the rotated square
    inside, outside = margin > 1, margin < -1
    print(f"{int(inside.sum())} pixels inside, {int(outside.sum())} outside checked")
    assert inside.sum() > 20 and torch.all(out[inside] == 1) and torch.all(out[outside] == 0)
    cx, cy = centre_of_mass(out)
    assert abs(cx) < 1e-6 and abs(cy) < 1e-6
    assert abs(out.sum().item() / 64 - 1) < 0.02  # area kept


def test_translation_moves_the_centre_of_mass_by_the_expected_pixels() -> None:
    for tx, ty in ((0.1, -0.15), (-0.2, 0.2), (0.031, 0.0)):
        out = post_affine(blob(), *params(translate=(tx, ty)), apply=only(TRANSLATE))
        cx, cy = centre_of_mass(out[0, 0])
        print(f"translate ({tx}, {ty}): centre moved to ({cx:.3f}, {cy:.3f}) px")
        assert abs(cx - 32 * tx) < 0.5 and abs(cy - 32 * ty) < 0.5


def test_outside_the_frame_is_black() -> None:
    """imgaug's mode="constant", cval=0: what moves in from outside is 0, not an edge copy."""
    x = torch.full((1, 3, 32, 32), 255.0)
    out = post_affine(x, *params(translate=(0.25, 0.0)), apply=only(TRANSLATE))[0]
    assert out[:, :, :8].eq(0).all() and out[:, :, 8:].eq(255).all()
    small = post_affine(x, *params(scale=(0.5, 0.5)), apply=only(SCALE))[0]
    assert small[:, 0, 0].eq(0).all() and small[:, 15, 15].eq(255).all()


def test_scale_per_axis_stretches_the_content() -> None:
    """A Gaussian blob's spread along each axis grows by the scale factor of that axis."""
    x = blob(sigma=2.5)
    out = post_affine(x, *params(scale=(1.2, 0.8)), apply=only(SCALE))[0, 0]
    r = torch.arange(32, dtype=torch.float64) - 15.5
    spread_x = ((out * r[None, :] ** 2).sum() / out.sum()).sqrt().item()
    spread_y = ((out * r[:, None] ** 2).sum() / out.sum()).sqrt().item()
    before = ((x[0, 0] * r[None, :] ** 2).sum() / x[0, 0].sum()).sqrt().item()
    print(f"spread x {spread_x / before:.3f}, y {spread_y / before:.3f} of the original")
    assert abs(spread_x / before - 1.2) < 0.05 and abs(spread_y / before - 0.8) < 0.05


def test_steps_compose_in_the_drawn_order() -> None:
    """Translate right then turn clockwise ends below the centre; the other order, right of it."""
    x = blob()
    translate, angle, scale = params(translate=(0.2, 0.0), angle=90.0)
    translate_first = post_affine(x, translate, angle, scale, order=torch.tensor([[0, 1, 2]]))
    rotate_first = post_affine(x, translate, angle, scale, order=torch.tensor([[1, 0, 2]]))
    for out, expected in ((translate_first, (0.0, 6.4)), (rotate_first, (6.4, 0.0))):
        cx, cy = centre_of_mass(out[0, 0])
        assert abs(cx - expected[0]) < 0.05 and abs(cy - expected[1]) < 0.05


def test_no_step_selected_returns_the_images_unchanged() -> None:
    x = torch.rand(2, 3, 32, 32) * 255
    out = post_affine(
        x, *params(2, (0.1, 0.1), 10.0, (1.1, 0.9)), apply=torch.zeros(2, 3, dtype=torch.bool)
    )
    assert torch.equal(out, x)


# ---------------------------------------------------------------------------------------------
# The post's logged metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_METRICS.exists(), reason=f"no {SHARED_METRICS}")
def test_packaged_metrics_equal_the_shared_file() -> None:
    from importlib import resources

    packaged = resources.files("bnlab").joinpath("assets/post_logged_metrics.csv").read_bytes()
    assert packaged == SHARED_METRICS.read_bytes()


def test_logged_final_accuracies() -> None:
    assert LOGGED_FINAL == {"a": 0.8883, "b": 0.8939, "c": 0.8790}
    metrics = load_logged_metrics()
    assert sorted(metrics) == ["a", "b", "c"]
    for rows in metrics.values():
        assert [row["epoch"] for row in rows] == list(range(21))
        assert set(rows[0]) == {"epoch", "train_cost", "train_acc", "test_cost", "test_acc"}
        assert all(isinstance(row["test_acc"], float) for row in rows)
    assert max(row["test_acc"] for row in metrics["b"]) == 0.8970  # the README's "best"
    assert max(row["test_acc"] for row in metrics["c"]) == 0.8806
