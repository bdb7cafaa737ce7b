"""Test-wide settings.

The tests run on tiny tensors, where a second intra-op thread buys nothing and, on a busy
shared machine (CI runners, parallel jobs), costs 10-100x in spin-waiting. One thread keeps
the suite's time predictable; ``BNLAB_TEST_THREADS`` overrides it.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("BNLAB_TEST_THREADS", "1")))
