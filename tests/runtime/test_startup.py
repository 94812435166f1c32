"""luma-proxy run's start: restart under -O, and mitmproxy's addon registry left unimported."""

from __future__ import annotations

import pytest

from luma_proxy.runtime import startup


def test_only_run_restarts_and_only_once() -> None:
    assert startup.wants_optimized_restart(["run", "--http-port", "80"], {}, 0)
    assert not startup.wants_optimized_restart(["run"], {}, 1)  # already optimized
    assert not startup.wants_optimized_restart(["deploy", "--host", "a"], {}, 0)
    assert not startup.wants_optimized_restart([], {}, 0)
    assert not startup.wants_optimized_restart(["run"], {"LUMA_PROXY_OPTIMIZE": "0"}, 0)


def test_uvloop_by_default_and_asyncio_on_request() -> None:
    import uvloop

    assert startup.loop_factory({}) is uvloop.new_event_loop
    assert startup.loop_factory({"LUMA_PROXY_EVENT_LOOP": ""}) is uvloop.new_event_loop
    assert startup.loop_factory({"LUMA_PROXY_EVENT_LOOP": "asyncio"}) is None
    with pytest.raises(ValueError, match="LUMA_PROXY_EVENT_LOOP must be one of uvloop, asyncio"):
        startup.loop_factory({"LUMA_PROXY_EVENT_LOOP": "trio"})
