"""X-Request-ID: kept when sane, replaced otherwise, sent upstream and back to the client."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.proxy.composition import all_addons
from luma_proxy.proxy.requestid import HEADER, METADATA, RequestId, choose_request_id, is_sane
from tests.obs_util import flow_for, through, write_state

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("value", ["a", "A" * 200, "req-1.2_3:4@host/5+6=7", "0f3c9a"])
def test_sane_ids(value: str) -> None:
    assert is_sane(value)


@pytest.mark.parametrize(
    "value",
    ["", "A" * 201, "A" * 500, "has space", "line\nbreak", "tab\t", "ä", "<x>", '"q"', "a,b"],
)
def test_insane_ids(value: str) -> None:
    assert not is_sane(value)


def test_choose_keeps_one_sane_id_and_makes_fresh_ones_otherwise() -> None:
    assert choose_request_id(["abc-1"]) == "abc-1"
    made = {choose_request_id([]), choose_request_id(["a b"]), choose_request_id(["x", "y"])}
    assert len(made) == 3 and all(HEX32.fullmatch(m) for m in made)


@pytest.mark.spawns
def test_fresh_ids_are_unique_across_batches_and_forks() -> None:
    import subprocess
    import sys

    from luma_proxy.proxy.requestid import new_request_id

    ids = [new_request_id() for _ in range(3 * new_request_id.BATCH + 5)]
    assert len(set(ids)) == len(ids) and all(HEX32.fullmatch(i) for i in ids)
    # A forked child must not hand out what the parent has buffered (a process of
    # its own: forking the multi-threaded test process is unsafe).
    script = """
import os, sys
from luma_proxy.proxy.requestid import new_request_id
new_request_id()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, new_request_id().encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 64).decode(), new_request_id())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    child, parent = out.split()
    assert HEX32.fullmatch(child) and HEX32.fullmatch(parent) and child != parent


def test_sane_id_is_kept_and_returned() -> None:
    addon = RequestId()
    with taddons.context(addon):
        f = flow_for("blog.test", headers={"X-Request-ID": "client-42"})
        addon.requestheaders(f)
        assert f.request.headers.get_all(HEADER) == ["client-42"]
        assert f.metadata[METADATA] == "client-42"
        f.response = http.Response.make(200)
        f.response.headers[HEADER] = "something-the-app-made"
        addon.responseheaders(f)
        assert f.response.headers[HEADER] == "client-42"


@pytest.mark.parametrize("sent", [["x" * 500], ["has spaces"], ["new\nline"], ["a", "b"]])
def test_insane_or_repeated_id_is_replaced_everywhere(sent: list[str]) -> None:
    addon = RequestId()
    with taddons.context(addon):
        f = flow_for("blog.test")
        for value in sent:
            f.request.headers.add(HEADER, value)
        addon.requestheaders(f)
        (replaced,) = f.request.headers.get_all(HEADER)
        assert HEX32.fullmatch(replaced)
        assert f.metadata[METADATA] == replaced


async def test_proxys_own_pages_carry_the_id(tmp_path: Path) -> None:
    request_id, router = RequestId(), LumaProxy()
    addons = [request_id, router]
    with taddons.context(*addons) as tctx:
        tctx.configure(router, luma_state=str(write_state(tmp_path / "state.json")))
        for host, status in (("nope.test", 404), ("down.test", 503)):
            f = await through(addons, flow_for(host, headers={HEADER: "mine"}))
            assert f.response is not None and f.response.status_code == status
            assert f.response.headers[HEADER] == "mine"
        f = await through(addons, flow_for("blog.test"))
        assert f.request.host == "127.0.0.9"  # routed, and upstream gets the same id
        assert f.request.headers[HEADER] == f.response.headers[HEADER] == f.metadata[METADATA]


def test_addon_order_request_id_first_observers_after_routing() -> None:
    names = [type(a).__name__ for a in all_addons()]
    assert names[0] == "RequestId"
    assert names.index("LumaProxy") < names.index("AccessLog")
    assert names.index("LumaProxy") < names.index("Metrics")
