"""The access log: one line per request, its fields, formats, and the JSON log formatter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import exceptions, flow, http
from mitmproxy.test import taddons

from luma_proxy.proxy.accesslog import (
    AccessLog,
    JsonFormatter,
    LineWriter,
    configure_logging,
    default_log_format,
    iso_utc,
    milliseconds,
    render_text,
)
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.proxy.flowinfo import error_status, status_class
from luma_proxy.proxy.requestid import RequestId
from luma_proxy.proxy.streaming import ByteCounter, stream_counted
from tests.obs_util import call, flow_for, through, write_state


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


async def lines(stream: io.StringIO) -> list[str]:
    """The lines written so far (the fixture's writer flushes at the end of the loop's turn)."""
    await asyncio.sleep(0)
    return stream.getvalue().splitlines()


@pytest.fixture
def chain(tmp_path: Path, out: io.StringIO) -> Iterator[tuple[list, taddons.context]]:
    """RequestId, LumaProxy, AccessLog, as all_addons() orders them, with a state file."""
    addons = [RequestId(), LumaProxy(), AccessLog(LineWriter(out, interval=0))]
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[1], luma_state=str(write_state(tmp_path / "state.json")))
        tctx.configure(addons[2], luma_log_format="json")
        yield addons, tctx


def test_iso_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
    assert iso_utc(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"
    assert iso_utc(1_700_000_001.5) == "2023-11-14T22:13:21.500Z"  # the next second
    assert iso_utc(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"  # and back


def test_milliseconds_are_rounded_to_the_microsecond() -> None:
    assert milliseconds(0.0012345) == 1.235 or milliseconds(0.0012345) == 1.234
    assert milliseconds(1.5) == 1500.0 and milliseconds(0.0001) == 0.1
    assert milliseconds(-0.2) == 0.0  # a clock stepped back: never a negative duration
    for n in range(0, 2_000_000, 7919):  # as round() gives them, wherever round is exact
        seconds = n / 1_000_000 + 0.0000001
        assert milliseconds(seconds) == round(seconds * 1000, 3)


async def test_routed_request_gives_one_json_line_with_every_field(chain, out) -> None:
    addons, _ = chain
    f = flow_for("Blog.Test", "/a/b?token=secret", headers={"User-Agent": "probe/1.0 (x)",
                                                            "X-Request-ID": "rid-1"},
                 method="POST", body=b"12345")
    await through(addons, f, http.Response.make(201, b"created!", {"Content-Length": "8"}))
    await call(addons, "error", f)  # a late error hook must not add a second line
    (line,) = await lines(out)
    entry = json.loads(line)
    assert entry == {
        "time": entry["time"], "level": "info", "msg": "request",
        "host": "Blog.Test", "method": "POST", "path": "/a/b", "status": 201,
        "duration_ms": entry["duration_ms"], "bytes_in": 5, "bytes_out": 8,
        "service": "blog.test", "project": "p", "container_ip": "127.0.0.9",
        "request_id": "rid-1", "client": "203.0.113.7", "user_agent": "probe/1.0 (x)",
    }
    assert entry["time"].endswith("Z") and 0 <= entry["duration_ms"] < 5000
    assert "secret" not in line


async def test_query_string_only_when_asked(chain, out) -> None:
    addons, tctx = chain
    tctx.configure(addons[2], luma_log_query=True)
    await through(addons, flow_for("blog.test", "/reset?token=secret"))
    assert json.loads((await lines(out))[0])["path"] == "/reset?token=secret"


async def test_proxys_own_answers_are_logged(chain, out) -> None:
    addons, _ = chain
    await through(addons, flow_for("nope.test"))
    await through(addons, flow_for("down.test"))
    unknown, down = (json.loads(line) for line in await lines(out))
    assert (unknown["status"], unknown["service"], unknown["container_ip"]) == (404, "", "")
    assert unknown["request_id"] and unknown["bytes_out"] > 0
    assert (down["status"], down["service"], down["project"]) == (503, "down.test", "q")


async def test_errors_are_logged_once_with_the_status_the_client_saw(chain, out) -> None:
    addons, _ = chain
    f = flow_for("blog.test")
    await call(addons, "requestheaders", f)
    f.error = flow.Error("Connect call failed ('127.0.0.9', 3000)")
    await call(addons, "error", f)
    await call(addons, "error", f)
    (line,) = await lines(out)
    entry = json.loads(line)
    assert (entry["status"], entry["container_ip"]) == (502, "127.0.0.9")
    assert entry["error"].startswith("Connect call failed")


def test_error_status() -> None:
    f = flow_for("blog.test")
    f.error = flow.Error("Client disconnected.")
    assert error_status(f) == 499
    f.error = flow.Error("stream reset by client (CANCEL)")
    assert error_status(f) == 499
    f.error = flow.Error("server closed connection")
    assert error_status(f) == 502
    f.error = flow.Error("Received multiple content-length headers: [b'4', b'40'] from client, "
                         "refusing to prevent request smuggling attacks.")
    assert error_status(f) == 400  # what mitmproxy answered the client, not an upstream fault
    f.response = http.Response.make(200)  # headers already sent: a stream cut short
    assert error_status(f) == 200


def test_status_class() -> None:
    assert [status_class(s) for s in (101, 200, 304, 404, 499, 503, 42)] == [
        "1xx", "2xx", "3xx", "4xx", "4xx", "5xx", "other"]


async def test_streamed_bodies_are_counted_not_read(chain, out) -> None:
    addons, _ = chain
    f = flow_for("blog.test")
    seen = []
    f.request.stream = lambda chunk: seen.append(chunk) or chunk.upper()  # e.g. a size limit
    await call(addons, "requestheaders", f)  # the routing addon counts what streams
    assert isinstance(f.request.stream, ByteCounter) and not isinstance(
        f.request.stream.inner, ByteCounter)
    stream_counted(f.request)  # wrapped once only
    assert not isinstance(f.request.stream.inner, ByteCounter)
    for chunk in (b"abc", b"de", b""):
        assert f.request.stream(chunk) == chunk.upper()
    assert seen == [b"abc", b"de", b""]
    f.request.data.content = None
    f.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
    await call(addons, "responseheaders", f)  # the routing addon streams and counts SSE
    assert isinstance(f.response.stream, ByteCounter)
    for chunk in (b"data: 1\n\n", b"data: 2\n\n", b""):
        f.response.stream(chunk)
    f.response.data.content = None  # nothing was kept
    await call(addons, "response", f)
    entry = json.loads((await lines(out))[0])
    assert (entry["bytes_in"], entry["bytes_out"]) == (5, 18)


async def test_text_format_is_one_line_and_quotes_what_needs_it(chain, out) -> None:
    addons, tctx = chain
    tctx.configure(addons[2], luma_log_format="text")
    f = flow_for("blog.test", "/x", headers={"User-Agent": 'evil\n"agent" 1.0'})
    await through(addons, f)
    (line,) = await lines(out)
    assert line.split()[1:5] == ["200", "GET", "blog.test", "/x"]
    assert " service=blog.test project=p ip=127.0.0.9 " in line
    assert 'ua="evil\\n\\"agent\\" 1.0"' in line


def test_text_rendering_of_empty_values() -> None:
    entry = {"time": "T", "status": 404, "method": "GET", "host": "", "path": "/",
             "duration_ms": 0.1, "bytes_in": 0, "bytes_out": 9, "service": "", "project": "",
             "container_ip": "", "request_id": "r", "client": "1.2.3.4", "user_agent": "",
             "error": "boom x"}
    assert render_text(entry) == ('T 404 GET - / 0.1ms in=0 out=9 service=- project=- ip=- id=r '
                                  'client=1.2.3.4 ua=- error="boom x"')


@pytest.mark.parametrize("odd", ["", "a b", 'q"', "tab\t", "ü", "x\ny"])
@pytest.mark.parametrize("field", ["method", "host", "path", "service", "project", "user_agent"])
def test_text_quotes_each_field_on_its_own_merits(field: str, odd: str) -> None:
    """The one-regex shortcut for all-plain lines gives what quoting each field gives."""
    from luma_proxy.proxy.accesslog import _text

    entry = {"time": "T", "status": 200, "method": "GET", "host": "a.test", "path": "/p",
             "duration_ms": 1.5, "bytes_in": 0, "bytes_out": 2, "service": "a.test",
             "project": "p", "container_ip": "10.0.0.2", "request_id": "r", "client": "::1",
             "user_agent": "curl/8"}
    entry[field] = odd
    e = {k: _text(v) if isinstance(v, str) else v for k, v in entry.items()}
    assert render_text(entry) == (
        f"T 200 {e['method']} {e['host']} {e['path']} 1.5ms in=0 out=2 service={e['service']} "
        f"project={e['project']} ip=10.0.0.2 id=r client=::1 ua={e['user_agent']}")


def test_bad_format_is_refused() -> None:
    addon = AccessLog()
    with taddons.context(addon) as tctx, pytest.raises(exceptions.OptionsError):
        tctx.configure(addon, luma_log_format="xml")


def test_format_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUMA_PROXY_LOG_FORMAT", raising=False)
    assert default_log_format() == "text"
    monkeypatch.setenv("LUMA_PROXY_LOG_FORMAT", "JSON")
    assert default_log_format() == "json"
    monkeypatch.setenv("LUMA_PROXY_LOG_FORMAT", "yaml")
    assert default_log_format() == "text"


def test_writer_goes_to_stdout_one_write_and_survives_a_broken_pipe(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(AccessLog().write, LineWriter)
    LineWriter()("first line")
    assert capsys.readouterr().out == "first line\n"

    class Broken(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            Broken.writes += 1
            raise BrokenPipeError("EPIPE")

    writer = LineWriter(Broken())
    writer("a")
    writer("b")
    assert Broken.writes == 2
    assert caplog.text.count("cannot write the access log") == 1


class Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_leave_together_after_the_interval_and_done_flushes() -> None:
    stream = Counting()
    writer = LineWriter(stream, interval=0.05)
    for n in range(3):
        writer(f"line {n}")
    await asyncio.sleep(0)
    assert stream.getvalue() == ""  # waiting for the ones after it
    await asyncio.sleep(0.2)
    assert stream.getvalue() == "line 0\nline 1\nline 2\n" and stream.writes == 1
    log = AccessLog(writer)
    writer("last")
    log.done()  # shutdown: nothing waits for the timer
    assert stream.getvalue().endswith("line 2\nlast\n") and stream.writes == 2


async def test_many_waiting_lines_are_written_at_once_and_interval_zero_is_one_turn() -> None:
    from luma_proxy.proxy.accesslog import MAX_PENDING

    stream = Counting()
    writer = LineWriter(stream, interval=60)
    for n in range(MAX_PENDING):
        writer(f"{n}")
    assert stream.writes == 1 and stream.getvalue().count("\n") == MAX_PENDING
    turn = Counting()
    writer = LineWriter(turn, interval=0)
    writer("a")
    writer("b")
    await asyncio.sleep(0)
    assert turn.getvalue() == "a\nb\n" and turn.writes == 1


def test_json_formatter_renders_any_record_as_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("luma_proxy").makeRecord(
            "luma_proxy", logging.WARNING, __file__, 1, "health: %s is %s",
            ("blog.test", "unhealthy"), sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["level"] == "warning" and entry["logger"] == "luma_proxy"
    assert entry["msg"] == "health: blog.test is unhealthy"
    assert "ValueError: bad\nthing" in entry["exc"] and entry["time"].endswith("Z")


def test_configure_logging_json_swaps_the_root_handler() -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    stream = io.StringIO()
    try:
        configure_logging("text", stream)
        assert root.handlers == saved
        configure_logging("json", stream)
        logging.getLogger("luma_proxy").error("cannot save health: %s", "disk full")
    finally:
        root.handlers[:] = saved
    assert json.loads(stream.getvalue())["msg"] == "cannot save health: disk full"
    with pytest.raises(ValueError):
        configure_logging("xml")


WRITER_PROCESS = """
import asyncio, sys
from luma_proxy.proxy.accesslog import LineWriter

async def main() -> None:
    writer = LineWriter(interval=0)
    for n in range(3000):
        writer(f"begin {sys.argv[1]} {n} " + "x" * 180 + " end")
        if n % 400 == 399:
            await asyncio.sleep(0)  # a batch of 400 lines (~80 kB) leaves
    writer.flush()

asyncio.run(main())
"""


@pytest.mark.spawns
def test_workers_sharing_one_pipe_never_tear_a_line() -> None:
    """Real processes, one pipe: every line arrives whole (batches far above PIPE_BUF)."""
    import re
    import subprocess

    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, str(w)], stdout=write)
             for w in range(4)]
    os.close(write)
    chunks = []
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while chunk := pipe.read(4096):  # a slow reader: the pipe is full, writers wait
            chunks.append(chunk)
            time.sleep(0.0005)
    data = b"".join(chunks)
    assert all(p.wait(timeout=60) == 0 for p in procs)
    lines = data.decode().splitlines()
    whole = re.compile(r"begin \d \d+ x{180} end")
    torn = [line for line in lines if not whole.fullmatch(line)]
    assert not torn and len(lines) == 4 * 3000


async def test_a_held_request_says_how_long_it_waited(chain, out) -> None:
    addons, tctx = chain
    router = next(a for a in addons if isinstance(a, LumaProxy))
    tctx.configure(router, luma_hold_timeout=0.2)
    router.balancer.eject("127.0.0.9", 3000)
    await through(addons, flow_for("blog.test"))
    entry = json.loads((await lines(out))[0])
    assert entry["status"] == 503 and 200 <= entry["held_ms"] < 2000
    assert render_text(entry).endswith(f" held={entry['held_ms']}ms")
