"""The evidence kit: paired differences and their t interval, verdicts, the palette, the page."""

from __future__ import annotations

import math

import pytest

from bnlab.evidence import figures, page, stats


def test_t_interval_matches_the_textbook_quantiles():
    # t_{0.975} for 1, 4 and 9 degrees of freedom: 12.706, 2.776, 2.262 (any t table)
    for n, quantile in ((2, 12.706), (5, 2.776), (10, 2.262)):
        low, high = stats.t_interval({"mean": 0.0, "std": 1.0, "n": n})
        print(n, high * math.sqrt(n), quantile)
        assert high * math.sqrt(n) == pytest.approx(quantile, abs=5e-4)
        assert low == pytest.approx(-high)
    assert stats.t_interval({"mean": 1.0, "std": 0.0, "n": 1}) is None
    with pytest.raises(ValueError, match="confidence must be in"):
        stats.t_interval({"mean": 0.0, "std": 1.0, "n": 3}, confidence=1.5)


def test_paired_difference_pairs_by_seed_and_skips_missing_runs():
    a = {0: 0.70, 1: 0.72, 2: None, 3: 0.69}
    b = {0: 0.60, 1: 0.61, 2: 0.50, 3: float("nan"), 4: 0.1}
    d = stats.paired_difference(a, b)
    assert d["values"] == pytest.approx([0.10, 0.11]) and d["n"] == 2
    assert d["mean"] == pytest.approx(0.105)
    half = 12.706 * d["std"] / math.sqrt(2)
    assert d["low"] == pytest.approx(0.105 - half, rel=1e-4)
    assert d["high"] == pytest.approx(0.105 + half, rel=1e-4)
    one = stats.paired_difference({0: 0.7}, {0: 0.6})
    assert one["n"] == 1 and one["low"] is None and one["high"] is None


@pytest.mark.parametrize(("low", "high", "expected", "min_effect", "verdict"), [
    (0.02, 0.05, "above", 0.0, "supported"),
    (0.02, 0.05, "above", 0.03, "inconclusive"),   # not beyond the minimum effect
    (-0.01, 0.05, "above", 0.0, "inconclusive"),   # "no significant difference"
    (-0.05, -0.02, "above", 0.0, "contradicted"),
    (-0.05, -0.02, "below", 0.0, "supported"),
    (None, None, "above", 0.0, "inconclusive"),
])
def test_interval_verdict(low, high, expected, min_effect, verdict):
    assert stats.interval_verdict({"low": low, "high": high}, expected, min_effect) == verdict
    assert verdict in stats.VERDICTS


def test_one_colour_per_normalization_and_case():
    assert figures.color("b") == figures.color("torch") == figures.color("bn")
    assert figures.color("a") == figures.color("none")
    assert figures.color("c") == figures.color("bnlab")
    named = {figures.color(k) for k in ("none", "torch", "bnlab", "d", "b-manual", "b-act",
                                        "b-act-rule", "c-fixed")}
    assert len(named) == 8  # no two named keys share a colour
    assert figures.color("other", 0) not in named


def test_page_is_self_contained_with_figures_and_tables(tmp_path):
    (tmp_path / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n0000")
    html = page.markdown_to_html(
        "# Q1 & more\n\n| a | b |\n|---|---|\n| 1 | **2** |\n\n![A *caption*](f.png)\n",
        tmp_path, "title <x>")
    assert "<title>title &lt;x&gt;</title>" in html and "<h1>Q1 &amp; more</h1>" in html
    assert "<td><strong>2</strong></td>" in html
    assert "<figure><img" in html and "<figcaption>A <em>caption</em></figcaption>" in html
    assert "data:image/png;base64," in html and 'src="f.png"' not in html
    assert "<p><figure>" not in html
    with pytest.raises(FileNotFoundError):
        page.markdown_to_html("![x](missing.png)\n", tmp_path, "t")
