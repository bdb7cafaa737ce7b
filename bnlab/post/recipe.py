"""The post's data recipe: half-batches of originals plus augmented copies, standardised per batch.

What the post's TensorFlow code did (``JaeDukSeo/Daily-Neural-Network-Practice-2``, folder
``Understanding_Concepts/batch/``, ``c.py`` at commit ``117a249``; ``a.py`` and ``b.py`` share
it), rebuilt in batched torch operations on the data's device:

1. Every epoch the training set is shuffled. Each step takes the next B/2 images (25 for the
   post's B = 50) and adds an augmented copy of each, labels duplicated, so an epoch has
   ``N // (B/2)`` steps (2,000 on CIFAR-10) and every image is seen twice: once as itself,
   once as a copy.
2. The copies (only they) are mirrored left-right, always, and then, each with probability
   ``AUGMENT_PROBABILITY`` = 0.1 independently and in a random order per image: translated
   by up to 20% of the width in x and of the height in y, rotated by up to 25 degrees,
   scaled by a factor in 0.8..1.2 per axis. The post used imgaug's ``Affine`` (bilinear,
   black outside the image, about the image centre); here the drawn transforms become one
   affine matrix per image, applied with ``affine_grid``/``grid_sample``.
3. The B images are standardised per pixel and channel with the mean and standard deviation
   of that batch (statistics of shape (3, H, W) over the batch axis) and shuffled together.
   The test set is standardised per pixel and channel with the statistics of the whole test
   set, and evaluated in its stored order.

Shapes: N images, C = 3 channels, H x W pixels (32 x 32); images (N, C, H, W). Pixel values
stay in pixel units (0..255) until standardisation, as in the post (it never divides by 255).

    >>> import torch
    >>> from bnlab.data import load_cifar10
    >>> from bnlab.post.recipe import post_steps_per_epoch, post_test_batches, post_train_batches
    >>> ds = load_cifar10(download=False)                        # doctest: +SKIP
    >>> post_steps_per_epoch(50_000, 50)
    2000
    >>> g = torch.Generator().manual_seed(678)
    >>> for images, labels in post_train_batches(ds, 50, generator=g):   # doctest: +SKIP
    ...     pass    # images: float32 (50, 3, 32, 32), per-pixel standardised; labels: (50,)
    >>> for images, labels in post_test_batches(ds, 50):          # doctest: +SKIP
    ...     pass

Where the post's code leaves room, this module decides as follows.

* Division by std, not sqrt(var + eps). The post divides by ``np.std`` (population
  standard deviation, ``ddof=0``) with no epsilon, for the training batches and the test
  set alike. :func:`standardize_per_pixel` computes ``(x - mean) / (std + eps)`` with the
  population std and ``eps = STANDARDIZE_EPS = 1e-8``: in float32 ``std + 1e-8 == std``
  for every std of 0.25 pixel units or more (real batches of 50: about 48 to 80), so this is the
  post's formula, while a pixel that is constant over the batch gives a finite value (0
  when the mean is exact) instead of the post's NaN. ``eps=0`` is the post's formula
  exactly, NaN included. (sqrt(var + eps) would differ as little; std + eps is the
  post's own expression with a guard added.)
* Scale and translation per axis, independently. The post passes dicts
  (``scale={"x": (0.8, 1.2), "y": (0.8, 1.2)}``, likewise ``translate_percent``), for which
  imgaug samples x and y independently; so the scale is anisotropic, as in the post.
* Flip first. imgaug's ``random_order=True`` shuffled the flip among the three affine
  steps too. Mirroring conjugates a translation in x and a rotation into their negatives
  and leaves a scale as it is; all three ranges are symmetric, so flipping first and then
  applying the affine steps in random order gives the same distribution of copies.
* One resampling. imgaug resampled once per selected ``Affine`` (up to three bilinear
  passes, each cutting at the frame); here the selected steps are composed into one matrix
  in the drawn order and the image is resampled once. Copies with no step selected
  (about 0.9**3 = 73% of them) are not resampled at all: they are exact mirror images.
* The centre. imgaug transforms about pixel ((W - 1)/2, (H - 1)/2), which is the centre
  of ``affine_grid``'s ``align_corners=False`` coordinates; outside pixels are 0 (imgaug's
  ``mode="constant", cval=0``), interpolation bilinear (imgaug's ``order=1``).
* Signs. A positive translation moves the content right/down; a positive angle turns it
  clockwise as displayed (row index growing downwards), as imgaug's matrix does. The
  ranges are symmetric, so the sign conventions do not change the distribution.
* The post's loop would end an epoch with a short half-batch when B/2 does not divide N
  (it never did: 50,000 / 25); here the last partial half-batch is dropped.
* The post standardised, then shuffled; the statistics do not depend on the order, so the
  result is the same.

Every random number comes from the ``generator`` passed in, drawn on its device (CPU or
accelerator) and moved to the data's device, a fixed number per call, so an epoch is
reproducible from the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bnlab.data import CIFAR10

__all__ = [
    "AUGMENT_PROBABILITY",
    "POST_BATCH_SIZE",
    "ROTATE_DEGREES",
    "SCALE_RANGE",
    "STANDARDIZE_EPS",
    "TRANSLATE_FRACTION",
    "post_affine",
    "post_augment",
    "post_steps_per_epoch",
    "post_test_batches",
    "post_train_batches",
    "standardize_per_pixel",
]

# ---------------------------------------------------------------------------------------------
# The post's constants
# ---------------------------------------------------------------------------------------------

POST_BATCH_SIZE = 50  # images per step: 25 originals + their 25 augmented copies
AUGMENT_PROBABILITY = 0.1  # each affine step (translate, rotate, scale) is drawn with this
TRANSLATE_FRACTION = 0.2  # shift uniform in +-20% of the width (x) and of the height (y)
ROTATE_DEGREES = 25.0  # angle uniform in +-25 degrees
SCALE_RANGE = (0.8, 1.2)  # factor uniform in 0.8..1.2, drawn separately for x and y
STANDARDIZE_EPS = 1e-8  # added to the std; see the module docstring

TRANSLATE, ROTATE, SCALE = 0, 1, 2  # the affine steps, as indexed in ``apply`` and ``order``
_DRAWS_PER_IMAGE = 11  # 3 apply + 3 order keys + 2 translate + 1 angle + 2 scale


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def _inverse_step_matrices(
    translate: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(N, 3, 3, 3): the inverse of each step (translate, rotate, scale) in grid coordinates.

    Grid coordinates are ``affine_grid``'s with ``align_corners=False``: u = (2/W)(x - cx),
    v = (2/H)(y - cy), pixel (x, y), centre (cx, cy) = ((W - 1)/2, (H - 1)/2). In pixel units
    about the centre the forward steps are

        translate  p -> p + (tx W, ty H)
        rotate     p -> R p,  R = [[cos a, -sin a], [sin a, cos a]]   (clockwise on screen)
        scale      p -> diag(sx, sy) p

    and with D = diag(2/W, 2/H) their inverses in grid coordinates are D T^-1 D^-1:

        translate  (u, v) -> (u - 2 tx, v - 2 ty)
        rotate     [[cos a, sin a H/W], [-sin a W/H, cos a]]
        scale      diag(1/sx, 1/sy)
    """
    n = translate.shape[0]
    eye = torch.eye(3, dtype=translate.dtype, device=translate.device)
    steps = eye.repeat(n, 3, 1, 1)  # (N, step, 3, 3)
    steps[:, TRANSLATE, :2, 2] = -2.0 * translate
    radians = angle * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    steps[:, ROTATE, 0, 0] = cos
    steps[:, ROTATE, 0, 1] = sin * (height / width)
    steps[:, ROTATE, 1, 0] = -sin * (width / height)
    steps[:, ROTATE, 1, 1] = cos
    steps[:, SCALE, 0, 0] = 1.0 / scale[:, 0]
    steps[:, SCALE, 1, 1] = 1.0 / scale[:, 1]
    return steps


def post_affine(
    images: torch.Tensor,
    translate: torch.Tensor,
    angle: torch.Tensor,
    scale: torch.Tensor,
    *,
    apply: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Translate, rotate and scale each image with given parameters, in a given order (no flip).

    Args:
        images: float (N, C, H, W).
        translate: (N, 2) shifts (tx, ty) as fractions of the width and the height;
            positive moves the content right and down.
        angle: (N,) rotation in degrees about the image centre; positive turns clockwise
            as displayed.
        scale: (N, 2) factors (sx, sy); above 1 enlarges the content.
        apply: bool (N, 3), which steps (``TRANSLATE``, ``ROTATE``, ``SCALE`` = 0, 1, 2)
            each image gets; all by default. An image with no step is returned unchanged.
        order: int64 (N, 3), a permutation of (0, 1, 2) per image: ``order[i, 0]`` is
            applied first. (0, 1, 2) by default.

    Returns the images (same dtype, on their device), resampled once through the composed
    matrix: bilinear, 0 outside the frame, ``align_corners=False``.

        >>> x = torch.zeros(1, 3, 32, 32); x[..., 14:18, 2:6] = 1
        >>> y = post_affine(x, torch.tensor([[0.25, 0.0]]), torch.zeros(1), torch.ones(1, 2))
        >>> bool(y[0, 0, 14:18, 10:14].eq(1).all())   # moved right by 8 = 0.25 * 32 pixels
        True
    """
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(
            f"expected float images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    n, _, height, width = images.shape
    device, dtype = images.device, images.dtype
    translate, angle, scale = (t.to(device, dtype) for t in (translate, angle, scale))
    if apply is None:
        apply = torch.ones(n, 3, dtype=torch.bool, device=device)
    if order is None:
        order = torch.arange(3, device=device).expand(n, 3)
    apply, order = apply.to(device), order.to(device)

    steps = _inverse_step_matrices(translate, angle, scale, height, width)
    eye = torch.eye(3, dtype=dtype, device=device)
    steps = torch.where(apply[:, :, None, None], steps, eye)  # unselected steps: identity
    # Forward M = T[o2] T[o1] T[o0] (o0 first), so the grid's output -> input map is
    # M^-1 = T[o0]^-1 T[o1]^-1 T[o2]^-1.
    rows = torch.arange(n, device=device)
    inverse = steps[rows, order[:, 0]] @ steps[rows, order[:, 1]] @ steps[rows, order[:, 2]]
    grid = F.affine_grid(inverse[:, :2, :], list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Untouched images keep their exact values; torch.where avoids a host sync on the mask.
    return torch.where(apply.any(dim=1)[:, None, None, None], warped, images)


def post_augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    probability: float = AUGMENT_PROBABILITY,
) -> torch.Tensor:
    """The post's augmented copy of each image: mirrored, then rarely translated/rotated/scaled.

    Each image is mirrored left-right, then each affine step is drawn independently with
    ``probability`` (translation uniform in +-``TRANSLATE_FRACTION`` of the width in x and
    of the height in y; rotation uniform in +-``ROTATE_DEGREES``; scale uniform in
    ``SCALE_RANGE``, separately for x and y) and the drawn steps are applied in a random
    order per image, by :func:`post_affine` (one bilinear resampling). Copies with no step
    drawn are the exact mirror images.

    Args:
        images: uint8 or float (N, 3, H, W), pixel values (0..255).
        generator: the source of every random number; they are drawn on its device
            (``N * 11`` uniforms per call, whatever the probability) and moved to the
            images' device.
        probability: chance of each affine step; the post's 0.1 by default.

    Returns float32 (N, 3, H, W) in pixel units (float64 for float64 input), on the
    images' device.

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> y = post_augment(x, g, probability=0.0)
        >>> bool((y == x.flip(-1).float()).all())
        True
    """
    if images.ndim != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(
            f"expected uint8 or float images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    compute = torch.float64 if images.dtype == torch.float64 else torch.float32
    n = images.shape[0]
    draws = torch.rand(
        n, _DRAWS_PER_IMAGE, generator=generator, device=generator.device, dtype=torch.float32
    ).to(images.device)
    apply = draws[:, 0:3] < probability
    order = draws[:, 3:6].argsort(dim=1)  # a uniformly random permutation per image
    translate = (2.0 * draws[:, 6:8] - 1.0) * TRANSLATE_FRACTION
    angle = (2.0 * draws[:, 8] - 1.0) * ROTATE_DEGREES
    low, high = SCALE_RANGE
    scale = low + (high - low) * draws[:, 9:11]
    mirrored = images.flip(-1).to(compute)
    return post_affine(mirrored, translate, angle, scale, apply=apply, order=order)


# ---------------------------------------------------------------------------------------------
# Standardisation
# ---------------------------------------------------------------------------------------------


def standardize_per_pixel(images: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` with the mean and population std over dim 0 (the batch).

    For images (N, C, H, W) the statistics are (C, H, W): every pixel of every channel has
    its own. The std is the population one (divides by N, numpy's default, as the post
    used). ``eps`` guards a pixel that is constant over the batch; ``eps=0`` is the post's
    exact formula (NaN for such a pixel). Float16/bfloat16 inputs are computed in float32
    and rounded once; the result has the input's dtype, shape and memory format.

        >>> x = torch.rand(50, 3, 32, 32) * 255
        >>> z = standardize_per_pixel(x)
        >>> std, mean = torch.std_mean(z, dim=0, correction=0)
        >>> bool(mean.abs().max() < 1e-5), bool((std - 1).abs().max() < 1e-5)
        (True, True)
    """
    if not images.is_floating_point() or images.ndim < 1 or images.shape[0] < 1:
        raise ValueError(
            f"expected float values with a non-empty batch axis 0, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    compute = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    x = images.to(compute)
    # two passes with plain reductions: torch.std_mean over dim 0 is ~10x slower on CPU
    centred = x - x.mean(0)
    std = centred.square().mean(0).sqrt_()
    return centred.div_(std.add_(eps)).to(images.dtype)


def _test_set_statistics(
    images: torch.Tensor, dtype: torch.dtype, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and population std (C, H, W) of uint8 images, from exact integer sums.

    Sums of x and x**2 are accumulated in int64 chunk by chunk (no float copy of the whole
    set), so ``mean = S1 / M`` and ``var = (M S2 - S1**2) / M**2`` are exact up to the final
    float64 division; the results are returned in ``dtype`` on the images' device.
    """
    count = images.shape[0]
    sum1 = torch.zeros(images.shape[1:], dtype=torch.int64, device=images.device)
    sum2 = torch.zeros_like(sum1)
    for start in range(0, count, chunk):
        values = images[start : start + chunk].to(torch.int64)
        sum1 += values.sum(dim=0)
        sum2 += (values * values).sum(dim=0)
    sum1, sum2 = sum1.cpu(), sum2.cpu()  # 3 * H * W numbers: float64 works on every device
    mean = sum1.double() / count
    var = (count * sum2 - sum1 * sum1).double() / (count * count)
    return mean.to(images.device, dtype), var.sqrt().to(images.device, dtype)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def _check_batch_size(batch_size: int, num_train: int, source: str | None = None) -> None:
    """Raise ValueError unless ``batch_size`` is even, at least 2 and at most 2 * num_train."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(
            f"batch size must be even and at least 2 (half originals, half their augmented "
            f"copies; the post used 50 = 25 + 25), got {batch_size}"
        )
    if batch_size // 2 > num_train:
        data = f"{num_train} images of {source}" if source else f"{num_train} images"
        raise ValueError(
            f"batch size {batch_size} needs {batch_size // 2} original images a step, more "
            f"than the training set ({data}): use a batch size of at most {2 * num_train} "
            "or more data"
        )


def post_steps_per_epoch(num_train: int, batch_size: int = POST_BATCH_SIZE) -> int:
    """Steps in one epoch of :func:`post_train_batches`: ``num_train // (batch_size / 2)``.

    Raises ValueError for an odd batch size or one above ``2 * num_train``.

        >>> post_steps_per_epoch(50_000, 50), post_steps_per_epoch(20, 6)
        (2000, 6)
    """
    _check_batch_size(batch_size, num_train)
    return num_train // (batch_size // 2)


def post_train_batches(
    dataset: CIFAR10,
    batch_size: int = POST_BATCH_SIZE,
    *,
    generator: torch.Generator,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of the post's training batches ``(images, labels)`` on the data set's device.

    Each step takes the next ``batch_size / 2`` images of a fresh shuffle, appends their
    :func:`post_augment` copies (labels duplicated), standardises the ``batch_size`` images
    with :func:`standardize_per_pixel` and shuffles them together. There are
    :func:`post_steps_per_epoch` steps: the last partial half-batch is dropped, every other
    image is used once as an original and once as a copy.

    images: ``dtype`` (B, 3, 32, 32), channels_last memory format if asked; computed in
    float32 (float64 for ``dtype=torch.float64``) and rounded once. labels: int64 (B,).
    Every random number (epoch shuffle, augmentation, in-batch shuffle) comes from
    ``generator``, drawn on its device; call again for the next epoch. A bad batch size
    raises ValueError at the call, before any batch.

        >>> g = torch.Generator().manual_seed(678)
        >>> for images, labels in post_train_batches(ds.to("cuda"), generator=g):  # doctest: +SKIP
        ...     loss = criterion(model(images), labels)
    """
    _check_batch_size(batch_size, dataset.num_train, dataset.source)
    half = batch_size // 2
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = dataset.num_train, dataset.device
        order = torch.randperm(n, generator=generator, device=generator.device).to(device)
        for start in range(0, n - n % half, half):
            index = order[start : start + half]
            originals = dataset.train_images[index].to(compute)
            copies = post_augment(originals, generator)
            images = standardize_per_pixel(torch.cat((originals, copies)))
            labels = dataset.train_labels[index].repeat(2)
            mix = torch.randperm(batch_size, generator=generator, device=generator.device)
            mix = mix.to(device)
            images = images[mix]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images.to(dtype), labels[mix]

    return epoch()


def post_test_batches(
    dataset: CIFAR10,
    batch_size: int = POST_BATCH_SIZE,
    *,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set in stored order, standardised per pixel with the whole test set's statistics.

    The mean and population std (3, 32, 32) of all M test images are computed once per call
    (exactly, from integer sums); each batch is ``(x - mean) / (std + STANDARDIZE_EPS)``,
    never augmented. The last batch may be short. images: ``dtype`` (B, 3, 32, 32); labels:
    int64 (B,).

        >>> for images, labels in post_test_batches(ds, 50):      # doctest: +SKIP
        ...     correct += (model(images).argmax(1) == labels).sum()
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if dataset.num_test < 1:
        raise ValueError(f"the test set of {dataset.source} is empty: nothing to standardise")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    mean, std = _test_set_statistics(dataset.test_images, compute)
    denominator = std + STANDARDIZE_EPS

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, dataset.num_test, batch_size):
            images = dataset.test_images[start : start + batch_size].to(compute)
            images = (images - mean) / denominator
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images.to(dtype), dataset.test_labels[start : start + batch_size]

    return batches()
