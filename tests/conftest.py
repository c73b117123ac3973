import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Fixtures that run vLLM engines (or need engines running), and the pytest-xdist group of the tests
# using them (`make test` runs `-n 2 --dist loadgroup`): a group runs on one worker, which starts
# those engines once and shares them. Two groups of about the same size, so that each worker
# carries one and the tests that need no shared engine (unit tests, gateways, the NAT lab, suites
# that start their own daemons: the bench command, the churn soak) fill in around them:
# - "bf16": plain vLLM's reference answers, the single node, the hostile swarm (bf16 route);
# - "f32": the float32 reference and the float32 swarm.
# (With every engine in one group, that worker ran ~650 s while the other idled from ~500 s.)
# Three workers on 2 cores ran slower and timed out libp2p handshakes. A module whose
# module-scoped fixture runs engines names its group with ``pytest.mark.engines("group")``.
ENGINE_FIXTURES = {"single_node": "bf16", "plain_vllm_job": "bf16", "f32_reference_job": "f32"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(group): runs in that xdist group (see ENGINE_FIXTURES)")


def engine_group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("engines")
    if mark is not None:
        if not mark.args:
            raise pytest.UsageError(f"{item.nodeid}: pytest.mark.engines needs a group name (see ENGINE_FIXTURES)")
        return mark.args[0]
    for name in getattr(item, "fixturenames", ()):
        if name in ENGINE_FIXTURES:
            return ENGINE_FIXTURES[name]
    return None


GROUP_ORDER = {"bf16": 0, "f32": 1}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each engine test with its xdist group, and put the groups first, in GROUP_ORDER: xdist
    hands out work in collection order, so each worker starts on one group at once and the other
    tests fill in around them (a group reached late kept its worker busy long after the other
    finished), then the other slow tests (the longest work first evens out the end). The sort is
    stable: a module's tests keep their order."""
    rank = {}
    for item in items:
        group = engine_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if group:
            rank[item.nodeid] = GROUP_ORDER.get(group, len(GROUP_ORDER))
        else:
            rank[item.nodeid] = len(GROUP_ORDER) + (1 if item.get_closest_marker("slow") else 2)
    items.sort(key=lambda it: rank[it.nodeid])
