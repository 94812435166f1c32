"""The real engine for tests/docker: started (or found) once per run, stopped at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.docker.engine import Engine, EngineError
from tests.docker.scenarios import Bed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/docker/" in str(item.fspath):
            item.add_marker(pytest.mark.docker)
            # The first one also builds the images (minutes on a fresh machine).
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    e = Engine()
    try:
        e.ensure()
    except EngineError as err:
        if os.getuid() != 0 and not os.environ.get("CI"):
            pytest.skip(f"no Docker engine: {err}")
        raise  # as root, or on CI, a missing engine is a failure, not a skip
    try:
        yield e
    finally:
        e.cleanup()
        e.stop()


@pytest.fixture(scope="session")
def images(engine: Engine) -> dict[str, str]:
    return engine.images()


@pytest.fixture
def bed(engine: Engine, images: dict[str, str], request: pytest.FixtureRequest) -> Iterator[Bed]:
    b = Bed(engine, images, tag=request.node.name[:20].replace("_", "")).setup()
    try:
        yield b
    finally:
        b.close()
