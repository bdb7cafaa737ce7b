"""Build bnlab's embedded CIFAR-10 sample, bnlab/assets/cifar10_sample.npz.xz from a folder.

    python tools/make_embedded_sample.py ../shared/data/cifar10-sample
    python tools/make_embedded_sample.py ../shared/data/cifar10-sample --out /tmp/sample.npz.xz

The folder is read with bnlab's own safe loader (it must hold cifar-10-batches-py/ with the
first 1,017 images of each official batch file). The output is deterministic, so its
SHA-256 must equal ``EMBEDDED_SAMPLE_SHA256`` in bnlab/data.py; the script says whether it
does, and exits 1 if not (paste the printed value there after a deliberate change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnlab.data import (
    EMBEDDED_SAMPLE_PATH,
    EMBEDDED_SAMPLE_SHA256,
    EMBEDDED_TEST,
    EMBEDDED_TRAIN,
    load_cifar10_dir,
    write_embedded_sample,
)


def main(argv: list[str] | None = None) -> int:
    """Write the asset and report its size and SHA-256; 0 if it matches data.py's record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample_dir", type=Path, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--out", type=Path, default=EMBEDDED_SAMPLE_PATH, help="asset to write")
    args = parser.parse_args(argv)

    dataset = load_cifar10_dir(args.sample_dir)
    if (dataset.num_train, dataset.num_test) != (EMBEDDED_TRAIN, EMBEDDED_TEST):
        parser.error(
            f"{args.sample_dir} holds {dataset.num_train} train / {dataset.num_test} test images; "
            f"the embedded sample is {EMBEDDED_TRAIN} / {EMBEDDED_TEST}"
        )
    sha256 = write_embedded_sample(dataset, args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB)\nSHA-256 {sha256}")
    if sha256 != EMBEDDED_SAMPLE_SHA256:
        print(
            f"differs from EMBEDDED_SAMPLE_SHA256 in bnlab/data.py ({EMBEDDED_SAMPLE_SHA256}): "
            "record the new value there if the change is deliberate",
            file=sys.stderr,
        )
        return 1
    print("matches EMBEDDED_SAMPLE_SHA256 in bnlab/data.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
