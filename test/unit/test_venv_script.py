"""scripts/venv.sh, the README commands' virtual environment, on stand-ins for Debian's python3 and apt-get.

Debian and Ubuntu ship what ``python3 -m venv`` needs (ensurepip) in a package of
its own, python3.X-venv: the stand-in python3 fails ``-m venv`` the way theirs does
until the stand-in apt-get "installs" it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REAL_PYTHON = str(Path(sysconfig.get_config_var("BINDIR") or Path(sys.base_prefix, "bin")) / "python3")
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

FAKE_PYTHON = """#!/bin/bash
if [ "$1 $2" = "-m venv" ] && [ ! -e "$FAKE/venv-package" ]; then
    echo "The virtual environment was not created successfully because ensurepip is not available." >&2
    exit 1
fi
if [ "$1" = "-c" ] && [ -n "${FAKE_VERSION:-}" ]; then
    exec "$REAL_PYTHON" -c "import sys; sys.version_info = ($FAKE_VERSION, 0, 'final', 0); exec(sys.argv[1])" "$2"
fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_APT = """#!/bin/bash
echo "apt-get $*" >> "$FAKE/calls"
if [ "$1" = install ]; then : > "$FAKE/venv-package"; fi
"""

FAKE_SUDO = """#!/bin/bash
echo "sudo $1" >> "$FAKE/calls"
exec "$@"
"""


@pytest.fixture
def machine(tmp_path):
    """A checkout holding the script, and a PATH with the stand-ins and the few tools the script uses."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for script in ("venv.sh", "apt-install.sh"):
        shutil.copy2(REPO / "scripts" / script, checkout / "scripts" / script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    fake = tmp_path / "fake"
    fake.mkdir()
    env = {"PATH": str(bin_dir), "FAKE": str(fake), "REAL_PYTHON": REAL_PYTHON, "HOME": str(tmp_path)}

    def install(name: str, text: str) -> None:
        (bin_dir / name).unlink(missing_ok=True)  # replace a link to the real tool, never write through it
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    install("python3", FAKE_PYTHON)
    return checkout, fake, env, install


def run(checkout: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(checkout / "scripts" / "venv.sh")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def calls(fake: Path) -> list[str]:
    path = fake / "calls"
    return path.read_text().splitlines() if path.exists() else []


def has_pip(checkout: Path) -> bool:
    return subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_python_that_can_make_venvs_gets_one_and_keeps_it(machine):
    checkout, fake, env, install = machine
    (fake / "venv-package").touch()
    done = run(checkout, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"venv: made .venv with Python {sys.version.split()[0]} (activate it with: . .venv/bin/activate)"
    assert has_pip(checkout) and calls(fake) == []
    (checkout / ".venv" / "kept").touch()
    again = run(checkout, env)
    assert (again.returncode, again.stdout) == (0, "") and (checkout / ".venv" / "kept").exists()


@pytest.mark.slow
@pytest.mark.parametrize("uid, via_sudo", [("0", False), ("1000", True)])
def test_without_the_venv_package_it_is_installed_from_apt_first(machine, uid, via_sudo):
    checkout, fake, env, install = machine
    install("apt-get", FAKE_APT)
    install("sudo", FAKE_SUDO)
    install("id", f"#!/bin/bash\necho {uid}\n")
    done = run(checkout, env)
    assert done.returncode == 0, done.stderr
    assert f"venv: installing python{VERSION}-venv" in done.stdout
    expected = ["apt-get update -qq", f"apt-get install -y -qq python{VERSION}-venv"]
    if via_sudo:
        expected = [line for call in expected for line in ("sudo apt-get", call)]
    assert calls(fake) == expected
    assert has_pip(checkout)


def test_without_apt_get_it_says_why_venv_failed(machine):
    checkout, fake, env, install = machine
    done = run(checkout, env)
    assert done.returncode == 1
    assert "ensurepip is not available" in done.stderr


def test_an_old_python_is_refused_in_one_line(machine):
    checkout, fake, env, install = machine
    done = run(checkout, {**env, "FAKE_VERSION": "3, 9"})
    assert done.returncode == 1
    assert done.stderr.strip() == ("venv: async-component needs Python 3.11 or newer; python3 is 3.9 "
                                   "(set PYTHON to another one)")
    assert not (checkout / ".venv").exists()


def test_without_python3_it_says_what_to_install(machine):
    checkout, fake, env, install = machine
    os.remove(Path(env["PATH"]) / "python3")
    done = run(checkout, env)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("venv: python3 is not on PATH: install Python 3.11 or newer")
