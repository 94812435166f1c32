"""The benchmark (benchmarks/perf.py) runs end to end in a very short mode, so it cannot rot.

Numbers are not checked: only that every section produces results and a report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import perf  # noqa: E402

pytestmark = pytest.mark.spawns  # runs the CLI / builds as real processes

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:8080/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.31ms    3.20ms  40.00ms   80.00%
    Req/Sec     2.00k   100.00     2.20k    70.00%
  Latency Distribution
     50%   11.50ms
     75%   13.00ms
     90%  850.00us
     99%    1.20s
  8000 requests in 2.00s, 1.20MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:   3999.50
Transfer/sec:    600.00KB
"""


def test_parse_wrk() -> None:
    r = perf.parse_wrk(WRK_OUTPUT)
    assert r["rps"] == 3999.5
    assert r["requests"] == 8000
    assert r["p50_ms"] == 11.5 and r["p90_ms"] == 0.85 and r["p99_ms"] == 1200.0
    assert r["errors"] == 5 and r["non2xx"] == 7


def test_update_doc_keeps_prose(tmp_path: Path) -> None:
    doc = tmp_path / "p.md"
    doc.write_text("# T\n\nprose\n\n<!-- BEGIN perf:a -->\nold\n<!-- END perf:a -->\n\nmore\n")
    perf.update_doc(doc, {"a": "new", "b": "added"})
    text = doc.read_text()
    assert "prose" in text and "more" in text and "new" in text and "old" not in text
    assert text.index("<!-- BEGIN perf:b -->") > text.index("more")


def test_summarize_profile() -> None:
    raw = ("main (luma_proxy/cli/commands.py:1);trigger (mitmproxy/addonmanager.py:2);"
           "_route (luma_proxy/proxy/addon.py:3) 3\n"
           "main (luma_proxy/cli/commands.py:1);write (asyncio/selector_events.py:4) 1\n")
    s = perf.summarize_profile(raw)
    assert s["samples"] == 4
    assert s["luma_inclusive_pct"] == 75.0
    assert s["hook_dispatch_inclusive_pct"] == 75.0


@pytest.mark.skipif(shutil.which("wrk") is None or not Path(perf.nginx_bin()).exists(),
                    reason="needs wrk and nginx (scripts/setup.sh installs them)")
def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    results = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "perf.py"),
           "--targets", "direct,mitmdump,noop,luma", "--loads", "c1,ka50,tls50",
           "--duration", "1", "--warmup", "0", "--pause", "0",
           "--sections", "throughput,memory,scale,streaming",
           "--memory-conns", "20", "--scale-sizes", "10,50", "--route-iterations", "200",
           "--no-scale-wrk", "--stream-bytes", str(4 << 20),
           "--out", str(out), "--results-dir", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for section in ("machine", "throughput", "memory", "scale", "streaming", "goals"):
        assert f"<!-- BEGIN perf:{section} -->" in text
    throughput = json.loads((results / "throughput.json").read_text())["results"]
    for key in ("direct", "mitmdump", "noop", "luma"):
        for load in ("c1", "ka50", "tls50"):
            cell = throughput["targets"][key]["loads"][load]
            assert cell["requests"] > 0 and not cell.get("failed"), (key, load, cell)
    streaming = json.loads((results / "streaming.json").read_text())["results"]
    for case in streaming["cases"].values():
        assert case["status"] == "200"
    assert "luma-proxy run" in text and "| goal | measured | verdict |" in text


def test_instruction_counts_are_read_from_the_newest_dump_and_rendered(tmp_path: Path) -> None:
    out = tmp_path / "callgrind-luma.out"
    for n, total in ((1, 500), (2, 7000), (10, 11000)):
        (tmp_path / f"{out.name}.{n}").write_text(
            f"# callgrind format\nversion: 1\ncmd: x\nevents: Ir\nsummary: {total}\n")
    assert perf.callgrind_total(out) == 11000  # .10 is newer than .2
    results = {"requests": 600, "idle_seconds": 20.0, "targets": {
        key: {"cmd": f"valgrind ... {key}", "title": key, "raw_per_request": v + 10,
              "idle_per_second": 5.0, "seconds": 30.0, "per_request": v}
        for key, v in (("noop", 2_000_000), ("luma", 2_190_000))}}
    text = perf.render_instructions(results, "benchmarks/perf.py --instructions",
                                    perf.machine())
    assert "**9.5 %**" in text and "190,000 instructions per request" in text
    rows = perf.goals(None, None, None, None, None, results)
    assert rows == [("(same, in instructions per request under callgrind: free of the machine's "
                     "noise)", "2,190,000 vs 2,000,000 (+9.5 %)", "met")]
