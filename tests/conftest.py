import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Fixtures that run vLLM engines (or need engines running), and the pytest-xdist group of the tests
# using them (`make test` runs `-n 2 --dist loadgroup`): a group runs on one worker, which starts
# those engines once and shares them. "engines": the single node and its plain-vLLM reference, the
# float32 reference and swarm, the hostile swarm. The other worker runs what needs no shared engine
# (unit tests, gateways, the NAT lab, and suites that start their own daemons: the bench command,
# the churn soak). Two engine groups on two workers queue every other test behind them (xdist hands a worker
# a whole group at once), and three workers on 2 cores ran slower and timed out libp2p handshakes.
# A module whose module-scoped fixture runs engines names its group with
# ``pytest.mark.engines("group")``.
ENGINE_FIXTURES = {"single_node": "engines", "plain_vllm_job": "engines", "f32_reference_job": "engines"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(group): runs in that xdist group (default: the shared engines')")


def engine_group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("engines")
    if mark is not None:
        return mark.args[0] if mark.args else "engines"
    for name in getattr(item, "fixturenames", ()):
        if name in ENGINE_FIXTURES:
            return ENGINE_FIXTURES[name]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = engine_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
