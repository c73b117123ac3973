import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Fixtures that run vLLM engines (or need engines running): every test using one goes to one
# pytest-xdist worker (`make test` runs `-n 2 --dist loadgroup`), which shares those engines and
# swarms; the other worker meanwhile runs what needs no shared engine (unit tests, gateways, the NAT
# lab, and suites that start their own daemons: the bench command, the churn soak, the local
# pipeline), so its waits and loads overlap the shared engines' work. A module whose module-scoped
# fixture runs engines names its group with ``pytest.mark.engines("group")``.
ENGINE_FIXTURES = {"single_node", "plain_vllm_job", "f32_reference_job"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(group): runs in that xdist group (default: the shared engines')")


def engine_group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("engines")
    if mark is not None:
        return mark.args[0] if mark.args else "engines"
    if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "engines"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = engine_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
