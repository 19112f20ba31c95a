"""Repository contracts: layout, dependency direction (STYLE.md R1), CLIs list only working verbs, lint."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ("model", "data_tools")


def test_layout() -> None:
    for name in ("jobs", "model", "data_tools", "slurm", "tests", "configs", "benchmarks"):
        assert (REPO / name).is_dir(), f"missing top-level directory {name}/"
    for name in ("environment.yml", "pyproject.toml", "Makefile", "README.md", ".ci/run", "constraints.txt"):
        assert (REPO / name).is_file(), f"missing {name}"
    for script in ("up", "down", "status"):
        path = REPO / "slurm" / "local" / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"slurm/local/{script} must exist and be executable"


def py_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", LIBRARY_PACKAGES)
def test_only_jobs_knows_slurm(package: str) -> None:
    """model/ and data_tools/ never import submitit, read SLURM_* or import jobs (deps point one way)."""
    offenders = []
    for path in py_files(package):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"^\s*(import|from)\s+(submitit|jobs)\b", line) or "SLURM_" in line:
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "library code must not know about SLURM/submitit/jobs:\n" + "\n".join(offenders)


def test_torch_pins_match() -> None:
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0"
    env = (REPO / "environment.yml").read_text()
    for name, version in pins.items():
        assert f"{name}=={version}" in env, f"environment.yml does not pin {name}=={version} like constraints.txt"


def help_verbs(module: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    return proc.returncode, proc.stdout


def test_jobs_help_lists_only_registered_verbs() -> None:
    from jobs.cli import build_parser

    rc, out = help_verbs("jobs")
    assert rc == 0
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    listed = set(re.findall(r"^    ([a-z][a-z-]+)", out, flags=re.M))
    assert listed == set(sub.choices), (listed, set(sub.choices))
    for verb in sub.choices:  # every listed verb has working --help (in process: one `python -m jobs` costs ~5 s)
        with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()) as text:
            build_parser().parse_args([verb, "--help"])
        assert done.value.code == 0 and f"usage: python -m jobs {verb}" in text.getvalue(), verb


def test_data_tools_help_lists_only_registered_verbs() -> None:
    from data_tools.cli import VERBS

    rc, out = help_verbs("data_tools")
    assert rc == 0
    listed = set(re.findall(r"^    ([a-z][a-z-]+)", out, flags=re.M))
    assert listed == set(VERBS)


def test_doctor_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "jobs", "doctor"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" in proc.stdout and "kernel" in proc.stdout


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff not installed"
)
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
