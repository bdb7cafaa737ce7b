"""The numbers the post logged: per case and epoch, train and test cost and accuracy.

The post's three training logs (``a/casea.txt``, ``b/caseb.txt``, ``c/casec.txt`` in
``JaeDukSeo/Daily-Neural-Network-Practice-2``, folder ``Understanding_Concepts/batch/``)
were transcribed into ``bnlab/assets/post_logged_metrics.csv``, one row per case and epoch::

    case,epoch,train_cost,train_acc,test_cost,test_acc
    a,0,1.4968,0.4558,1.0923,0.6150

``epoch`` counts from 0 as the logs do (21 epochs: 0..20). Train cost and accuracy are
means over the epoch's 2,000 training batches; test cost and accuracy are means over 200
test batches of 50. One run per case, seed 678.

    >>> from bnlab.post.log import LOGGED_FINAL, load_logged_metrics
    >>> metrics = load_logged_metrics()
    >>> sorted(metrics), len(metrics["a"])
    (['a', 'b', 'c'], 21)
    >>> metrics["b"][-1]["test_acc"], LOGGED_FINAL["b"]
    (0.8939, 0.8939)
"""

from __future__ import annotations

import csv
import io
from importlib import resources

__all__ = ["LOGGED_FINAL", "LOGGED_METRICS_RESOURCE", "load_logged_metrics"]

LOGGED_METRICS_RESOURCE = "assets/post_logged_metrics.csv"  # inside the bnlab package
_FLOAT_FIELDS = ("train_cost", "train_acc", "test_cost", "test_acc")


def load_logged_metrics() -> dict[str, list[dict]]:
    """Case ("a", "b", "c") -> its rows in epoch order, read from the packaged CSV.

    Each row is ``{"epoch": int (0-based), "train_cost": float, "train_acc": float,
    "test_cost": float, "test_acc": float}``. A fresh structure is returned on every call,
    so a caller may modify it.

        >>> rows = load_logged_metrics()["c"]
        >>> rows[0]["epoch"], rows[-1]["epoch"], rows[-1]["test_acc"]
        (0, 20, 0.879)
    """
    text = resources.files("bnlab").joinpath(LOGGED_METRICS_RESOURCE).read_text(encoding="utf-8")
    metrics: dict[str, list[dict]] = {}
    for record in csv.DictReader(io.StringIO(text)):
        row: dict = {"epoch": int(record["epoch"])}
        row.update((field, float(record[field])) for field in _FLOAT_FIELDS)
        metrics.setdefault(record["case"], []).append(row)
    for rows in metrics.values():
        rows.sort(key=lambda row: row["epoch"])
    return metrics


# Final test accuracy per case (after the last of the 21 epochs), read from the file:
# {"a": 0.8883, "b": 0.8939, "c": 0.8790}.
LOGGED_FINAL: dict[str, float] = {
    case: rows[-1]["test_acc"] for case, rows in load_logged_metrics().items()
}
