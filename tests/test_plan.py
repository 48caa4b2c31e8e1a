"""The analysis plans: every primary claim decidable at the default seeds under Holm, and the plan as printed."""

import math

import pytest

from poslens.analyses.experiments.presets import DEFAULT_SEEDS
from poslens.analyses.plan import (
    DYNAMICS_PLAN,
    REPRODUCE_PLAN,
    AnalysisPlan,
    PlannedClaim,
    decidability,
    minimal_seeds,
    smallest_p,
    split_seeds,
)


def test_every_primary_claim_is_decidable_at_the_default_seeds():
    table = decidability(REPRODUCE_PLAN, DEFAULT_SEEDS)
    assert len(table) == len(REPRODUCE_PLAN.primary) == 13
    assert table["decidable"].all(), table
    assert table["threshold"].iloc[0] == pytest.approx(0.05 / 13)  # Holm's worst case: the smallest p's threshold
    assert minimal_seeds(REPRODUCE_PLAN) == 3 <= DEFAULT_SEEDS  # the split-half test needs 2 seeds in its test half
    assert not decidability(REPRODUCE_PLAN, 2)["decidable"].all()
    assert minimal_seeds(DYNAMICS_PLAN, family_size=16) == 2  # one claim per run label and layer


def test_fisher_on_seeds_at_the_criterion_could_not_be_decided_at_five_seeds():
    """Why the learning claim's primary test is a paired t-test: Fisher's smallest one-sided p
    at 5 vs 5 is 1/252 = 0.004, above Holm's worst-case threshold 0.05 / 13 = 0.0038."""
    assert smallest_p("fisher", 5) == pytest.approx(1 / 252) and 1 / 252 > 0.05 / 13
    with_fisher = AnalysisPlan("p", 1, (*REPRODUCE_PLAN.primary[1:], PlannedClaim(
        "fisher", "learning", "learns", "share", "fisher", +1, "-", "-")), history="test")
    assert not decidability(with_fisher, 5).set_index("key").loc["fisher", "decidable"]
    assert minimal_seeds(with_fisher) == 6
    assert math.isnan(smallest_p("exact", 5)) and smallest_p("t", 1) == 1.0 and smallest_p("t", 2) == 0.0


def test_the_plan_prints_its_version_roles_and_changes_after_data():
    table = REPRODUCE_PLAN.table()
    assert list(table["key"]) == [claim.key for claim in REPRODUCE_PLAN.claims]
    assert set(table["role"]) == {"exact check", "primary (Holm family)", "secondary (beside, no verdict)"}
    haviv = table.set_index("key").loc["haviv_middle_fixed"]
    assert haviv["registered"].startswith("after the data were seen: the middle block was chosen")
    assert table.set_index("key").loc["shift", "registered"] == "before the data"
    header = REPRODUCE_PLAN.header()
    assert "version 3" in header and "Holm" in header and "Hewitt–Liang" in header
    assert not any(marker in table.to_string() for marker in ("dtype", "Name:", "array("))
    assert split_seeds([4, 0, 3, 1, 2]) == ([0, 1], [2, 3, 4])


@pytest.mark.parametrize("bad, message", [
    (lambda: PlannedClaim("k", "s", "c", "x", "wilcoxon", +1, "-", "-"),
     r"^claim k: unknown test wilcoxon; allowed: \['t', 'split_half_t', 'fisher', 'exact'\]$"),
    (lambda: PlannedClaim("k", "s", "c", "x", "t", 2, "-", "-"), r"^claim k: direction must be \+1, -1 or 0, got 2$"),
    (lambda: decidability(REPRODUCE_PLAN, 0), r"^n_seeds must be an integer >= 1, got 0$"),
    (lambda: REPRODUCE_PLAN.claim("nope"), r"^plan reproduce has no claim nope"),
])
def test_bad_plans_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
