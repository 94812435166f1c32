"""Deploy flows under load on a real engine (short runs; benchmarks/docker_bluegreen.py: full).

What must already hold is asserted: the per-colour flow loses nothing. The flows
issue 15 brings to zero (the Luma CLI's one-alias flow, kills, a single replica)
report their counts in the output; each scenario function returns its ``Load``,
so turning a report into an assertion is one line.
"""

from __future__ import annotations

import pytest

from tests.docker import scenarios
from tests.docker.scenarios import Bed

pytestmark = pytest.mark.docker


def report(name: str, text: str) -> None:
    print(f"\n[docker scenario] {name}: {text}")


def test_per_colour_alias_and_deploy_target_loses_nothing(bed: Bed) -> None:
    load = scenarios.scenario_per_colour(bed, deploys=3)
    report("per-colour alias + deploy --target, 3 deploys, 20+5 clients", load.summary())
    assert load.requests > 300
    assert load.failed == 0, load.summary()


def test_luma_cli_flow_is_served_throughout(bed: Bed) -> None:
    load = scenarios.scenario_luma_cli(bed, deploys=3)
    report("Luma CLI flow (CONTRACT.md 4), 3 deploys, 20+5 clients", load.summary())
    assert load.requests > 300
    assert load.failed < load.requests / 20  # serving throughout; issue 15 makes it 0


def test_kills_report(bed: Bed) -> None:
    load, in_flight = scenarios.scenario_kill(bed)
    report("docker kill of one replica, then of all old ones after a switch",
           f"{load.summary()}; in flight at the kills: {in_flight}")
    assert load.requests > 100


def test_single_replica_redeploy_report(bed: Bed) -> None:
    load = scenarios.scenario_single_replica(bed, gap=2.0)
    report("single replica redeployed with a 2 s gap", load.summary())
    assert load.requests > 100
