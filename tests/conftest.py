import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Fixtures that run vLLM engines (or need engines running): every test using one goes to one
# pytest-xdist worker (`make test` runs `-n 2 --dist loadgroup`), which shares those engines and
# swarms; the other worker meanwhile runs what needs no engine (unit tests, gateways, NAT lab), so
# its waits and the engines' loads overlap. Tests that start engines without these fixtures carry
# the ``engines`` marker.
ENGINE_FIXTURES = {"single_node", "plain_vllm_job", "f32_reference_job", "swarm", "stages", "pipeline_run"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines: starts vLLM engines without a shared engine fixture")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("engines") or ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("engines"))
