"""dd.data.sampler: class-balance weights (hand-computed) and the deterministic epoch order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dd.data.datasets import Sample
from dd.data.sampler import (
    NONE,
    SHARED,
    EpochSampler,
    Ratio,
    balance_table,
    balance_weights,
    is_positive,
    parse_balance,
)
from dd.errors import DDError


def _s(name: str, mask: bool, category: str | None, source: str = "human") -> Sample:
    return Sample(
        image=Path(f"{name}.png"),
        mask=Path(f"{name}-mask.png") if mask else None,
        source=source,
        category=category,
    )


def _dataset() -> list[Sample]:
    return [
        _s("h1", True, "hand"),
        _s("h2", True, "Hand "),  # categories match case-insensitively, stripped
        _s("hn", False, "hand"),  # a labelled artifact-free hand image
        *[_s(f"f{i}", True, "face", "synthetic") for i in range(4)],
        _s("rf", False, "face", "real"),  # a real photo of a face: a face negative
        *[_s(f"r{i}", False, None, "real") for i in range(3)],  # shared negatives
    ]


def test_parse_balance():
    assert parse_balance("hand=1:1, face=1:2 ,*=2:0.5") == {
        "hand": Ratio(1, 1),
        "face": Ratio(1, 2),
        "*": Ratio(2, 0.5),
    }
    assert parse_balance(None) == {} and parse_balance("  ") == {}
    assert parse_balance("HAND=1:3") == {"hand": Ratio(1, 3)}
    for bad in ("hand", "hand=1", "hand=a:b", "=1:1", "hand=0:1", "hand=1:1,hand=1:2"):
        with pytest.raises(DDError):
            parse_balance(bad)


def test_positive_means_a_mask_and_not_a_real_photo():
    assert is_positive(_s("a", True, None))
    assert not is_positive(_s("a", False, "hand"))
    assert not is_positive(_s("a", True, None, "real"))


def test_balance_weights_hand_computed():
    w, rows = balance_weights(_dataset(), parse_balance("hand=1:1,face=1:2"))
    # hand: 2 positives; negative mass 2 * 1/1 = 2 over {hn, r0, r1, r2} -> 0.5 each
    # face: 4 positives; negative mass 4 * 2/1 = 8 over {rf, r0, r1, r2} -> 2 each
    expected = [1, 1, 0.5, 1, 1, 1, 1, 2, 2.5, 2.5, 2.5]
    np.testing.assert_allclose(w, expected)
    total = 16.0
    by = {r.category: r for r in rows}
    assert [r.category for r in rows] == ["face", "hand", SHARED]
    assert (by["face"].positives, by["face"].negatives) == (4, 1)
    assert (by["hand"].positives, by["hand"].negatives) == (2, 1)
    assert by["face"].pos_share == pytest.approx(4 / total)
    assert by["face"].neg_share == pytest.approx(8 / total)
    assert by["hand"].pos_share == pytest.approx(2 / total)
    assert by["hand"].neg_share == pytest.approx(2 / total)
    assert by["face"].effective == "1:2.00" and by["hand"].effective == "1:1.00"
    assert by[SHARED].negatives == 3 and "46.9% of draws" in by[SHARED].note  # 7.5 / 16
    # the category rows account for every draw
    assert sum(r.pos_share + r.neg_share for r in rows if r.category != SHARED) == pytest.approx(
        1.0
    )


def test_balance_star_default_and_uncategorised_positives():
    data = [*_dataset(), _s("x", True, None)]
    w, rows = balance_weights(data, parse_balance("face=1:2,*=1:3"))
    # (none): 1 positive, negative mass 3 over the 3 shared -> 1 each; hand (via *): 2
    # positives, mass 6 over {hn, r0..r2} -> 1.5 each; face: 2 each on {rf, r0..r2}
    np.testing.assert_allclose(w, [1, 1, 1.5, 1, 1, 1, 1, 2, 4.5, 4.5, 4.5, 1])
    assert [r.category for r in rows] == ["face", "hand", NONE, SHARED]
    assert rows[1].ratio == "1:3" and rows[2].ratio == "1:3"


def test_unlisted_categories_keep_natural_weights():
    w, rows = balance_weights(_dataset(), parse_balance("hand=1:1"))
    # face unlisted and no "*": natural (1 each); shared drawn by hand only: 0.5 each
    np.testing.assert_allclose(w, [1, 1, 0.5, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5])
    assert {r.category: r.ratio for r in rows}["face"] == "natural"


def test_shared_negatives_are_never_dropped():
    # hand=1:0 asks for no negatives: nothing draws from the shared pool -> natural weights
    w, rows = balance_weights(_dataset(), parse_balance("hand=1:0,face=1:0"))
    np.testing.assert_allclose(w, [1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1])
    assert rows[-1].note == "natural frequency"
    # no balance at all: every weight 1
    w, rows = balance_weights(_dataset(), {})
    assert np.all(w == 1) and all(r.ratio == "natural" for r in rows[:-1])


def test_category_without_negatives_is_reported():
    data = [_s("h1", True, "hand"), _s("f1", False, "face")]
    w, rows = balance_weights(data, parse_balance("hand=1:1"))
    by = {r.category: r for r in rows}
    assert by["hand"].note == "no negatives available"
    np.testing.assert_allclose(w, [1, 1])  # face: no positives, natural
    with pytest.raises(DDError):
        balance_weights([], {})


def test_balance_table_renders():
    from rich.console import Console

    _, rows = balance_weights(_dataset(), parse_balance("hand=1:1,face=1:2"))
    console = Console(width=160, record=True)
    console.print(balance_table(rows, 16, "balance"))
    text = console.export_text()
    assert "face" in text and "1:2.00" in text and "25.0% (4)" in text


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    s = EpochSampler(10, seed=3, multiple=4)
    assert s.length == 8
    a, seeds_a = s.order(0)
    b, seeds_b = EpochSampler(10, seed=3, multiple=4).order(0)
    assert torch.equal(a, b) and torch.equal(seeds_a, seeds_b)
    assert len(set(a.tolist())) == 8  # a permutation: no repeats
    assert not torch.equal(s.order(1)[0], a)
    assert not torch.equal(EpochSampler(10, seed=4, multiple=4).order(0)[0], a)
    full = list(s)
    s.start = 4
    assert list(s) == full[4:] and len(s) == 4
    s.epoch, s.start = 1, 0
    assert [i for i, _ in s] == s.order(1)[0].tolist()


def test_weighted_epochs_follow_the_weights():
    weights = np.array([1.0, 3.0, 0.0, 4.0])
    s = EpochSampler(4, seed=0, weights=weights, length=40_000)
    idx, _ = s.order(0)
    freq = np.bincount(idx.numpy(), minlength=4) / 40_000
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.01)
    assert freq[2] == 0


def test_epoch_sampler_errors():
    with pytest.raises(DDError):
        EpochSampler(3, seed=0, multiple=4)
    with pytest.raises(DDError):
        EpochSampler(3, seed=0, weights=np.ones(2))
