"""The README's commands, run as written on a clean copy of the repository, the way CI runs them.

They run with ``python3`` on PATH being the machine's externally managed Python
(Debian's or Ubuntu's /usr/bin/python3, whose pip refuses to install anything)
where there is one, else the Python running these tests, and with no virtual
environment on PATH. They need PyPI, as the README's commands do.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from async_component.local.ports import free_port

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SETUP_TIMEOUT = 420
SYSTEM_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
"""A fresh login shell's PATH on Debian and Ubuntu (no virtual environment, no pyenv)."""


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


RUN_COMMAND, TEST_COMMAND = (block.strip() for block in code_blocks(section("Two commands")))


def test_ci_runs_the_readmes_test_command_as_written():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "\n" not in TEST_COMMAND and TEST_COMMAND in ci


def externally_managed(python: str) -> bool:
    stdlib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True).stdout.strip()
    return bool(stdlib) and (Path(stdlib) / "EXTERNALLY-MANAGED").is_file()


def system_python() -> str:
    """The externally managed /usr/bin/python3 when this machine has one, else the Python below the test's venv."""
    for candidate in ("/usr/bin/python3", shutil.which("python3", path=os.defpath)):
        if candidate and Path(candidate).exists() and externally_managed(candidate):
            return candidate
    return str(Path(sysconfig.get_config_var("BINDIR") or Path(sys.base_prefix, "bin")) / "python3")


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """A clean copy of the repository, and the environment of a fresh shell on this machine."""
    clone = tmp_path_factory.mktemp("readme") / "async-component"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    bin_dir = clone.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(system_python())
    tools = {str(Path(found).parent) for tool in ("redis-server", "curl") if (found := shutil.which(tool))}
    path = [str(bin_dir), *SYSTEM_PATH, *sorted(tools - set(SYSTEM_PATH))]
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TOX_", "_TOX", "PYTEST_", "PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=os.pathsep.join(path), TMPDIR=str(clone.parent))
    return clone, env


def describe(env: dict[str, str]) -> str:
    return f"python3 = {os.path.realpath(Path(env['PATH'].split(os.pathsep)[0], 'python3'))}"


class Output:
    """A process's output lines, read in a thread, for a test to wait on."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.ended = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if re.search(pattern, line)), None)

        with self.changed:
            self.changed.wait_for(lambda: found() or self.ended, timeout)
            line = found()
        assert line, f"no line matching {pattern!r}:\n{''.join(self.lines[-60:])}"
        return line


@pytest.mark.slow
def test_the_first_command_installs_into_a_venv_and_serves_the_quick_start(shell):
    clone, env = shell
    assert RUN_COMMAND.endswith("async-component local")
    port = free_port()
    # the command as written, on a free port instead of 8080
    process = subprocess.Popen(["bash", "-c", f"{RUN_COMMAND} --port {port}"], cwd=clone, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    output = Output(process.stdout)
    try:
        ready = output.wait_for(r"async-component local: ready at", SETUP_TIMEOUT)
        assert f"http://127.0.0.1:{port}" in ready, describe(env)
        assert (clone / ".venv" / "bin" / "async-component").exists()

        # the quick start's poll example, as written, against this stack
        lines = code_blocks(section("Quick start"))[0].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("location="))
        poll = "\n".join(lines[start:start + 2]).replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        answer = subprocess.run(["bash", "-c", poll], capture_output=True, text=True, timeout=30)
        assert re.match(r"HTTP/1.1 202 Accepted\r?\n", answer.stdout), answer.stdout + answer.stderr
        assert re.search(r'"state": ?"(queued|running)"', answer.stdout), answer.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert code == 0, "".join(output.lines[-40:])


@pytest.mark.slow
def test_the_kind_plan_prints_after_the_readmes_commands(shell):
    clone, env = shell
    set_up = TEST_COMMAND.rsplit(" && ", 1)[0]  # the test command without the tox run itself
    [plan] = [line.split("#")[0].strip() for line in code_blocks(section("End-to-end tests on kind"))[0].splitlines()
              if "e2e-plan" in line and "istio" not in line]
    done = subprocess.run(["bash", "-c", f"{set_up} && {plan}"], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    assert done.returncode == 0, f"{describe(env)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "install the component (kourier overlay)" in done.stdout
    assert "printed the kind plan; nothing was run" in done.stdout + done.stderr
