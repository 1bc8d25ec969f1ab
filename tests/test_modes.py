"""Mode coverage on hand-made assignments, nearest-centroid assignment, agreement."""

from __future__ import annotations

import math

import pytest

from manyways.modes import agreement, centroid_assign, effective_modes, mode_coverage


def test_effective_modes_is_exp_entropy() -> None:
    assert effective_modes(["a"] * 8) == pytest.approx(1.0)
    assert effective_modes(["a", "b", "c", "d"]) == pytest.approx(4.0)
    # 3 of a, 1 of b: exp(-(0.75 ln 0.75 + 0.25 ln 0.25))
    assert effective_modes(["a", "a", "a", "b"]) == pytest.approx(math.exp(0.5623351446188083))
    with pytest.raises(ValueError):
        effective_modes([])


def test_mode_coverage_on_hand_made_assignments() -> None:
    samples = [
        *(
            {"problem": "p1", "mode": m, "correct": c}
            for m, c in [("a", True), ("b", False), ("a", True), ("b", True)]
        ),
        *({"problem": "p2", "mode": "a", "correct": False} for _ in range(4)),
        {"problem": "p3", "mode": None, "correct": True},  # unassigned: counted, not in the entropy
    ]
    cov = mode_coverage(samples)
    assert cov["questions"] == 2 and cov["unassigned"] == 1 and cov["samples"] == 9
    assert cov["effective_modes_mean"] == pytest.approx((2.0 + 1.0) / 2)
    low, high = cov["effective_modes_ci"]
    assert 1.0 <= low <= 1.5 <= high <= 2.0
    assert cov["per_mode"]["a"] == {"samples": 6, "share": 0.75, "correct_share": pytest.approx(2 / 6)}
    assert cov["per_mode"]["b"] == {"samples": 2, "share": 0.25, "correct_share": 0.5}


def test_centroid_assignment_and_agreement() -> None:
    ref = [
        "work backward from the end undo",
        "undo the last step backward",
        "split into parts then add parts",
    ]
    modes = ["backward", "backward", "decompose"]
    got = centroid_assign(
        ["we undo each step backward", "split the sum into parts", ""], ref, modes, ngram_dim=256
    )
    assert got == ["backward", "decompose", None]
    assert agreement(got, ["backward", "backward", "decompose"]) == {"compared": 2, "agreement": 0.5}
    with pytest.raises(ValueError):
        agreement(["a"], [])
