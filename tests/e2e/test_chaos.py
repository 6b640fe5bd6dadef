"""The chaos round (tests/chaos.py) in the suite: one bounded, seeded round; each guarantee its own test.

`SHOAL_CHAOS_SEED` picks another round; bench/chaos.py runs many.
"""

from __future__ import annotations

import os

import pytest

from tests.chaos import Chaos, Report, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def round_(tmp_path_factory) -> Report:
    seed = int(os.environ.get("SHOAL_CHAOS_SEED", "1"))
    chaos = Chaos(tmp_path_factory.mktemp("chaos"), seed=seed)
    report = run(chaos)
    print("\n".join(chaos.log))
    print(report.summary())
    return report


def test_faults_were_injected(round_: Report) -> None:
    kinds = {f.rsplit("-", 1)[0] for f in round_.faults}
    assert {"scheduler", "rollout", "health", "query", "fleet", "nats"} <= kinds, round_.faults


def test_the_rolling_update_completes(round_: Report) -> None:
    assert round_.problems["rollout"] == []


def test_every_query_replica_lists_exactly_the_buckets(round_: Report) -> None:
    assert round_.problems["views"] == []


def test_no_node_is_bare_or_runs_two_executions(round_: Report) -> None:
    assert round_.problems["placement"] == []


def test_every_submission_is_applied_exactly_once(round_: Report) -> None:
    assert round_.problems["submissions"] == []


def test_every_replica_of_every_service_answers(round_: Report) -> None:
    assert round_.problems["services"] == []
