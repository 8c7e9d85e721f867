"""The `gemlora` command as a user runs it, and the README/CI contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemlora.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_generate_streams_a_completion(converted):
    out = run("generate", "Once upon a time", "--raw", "--model", str(converted), "--max-tokens", "12",
              "--temperature", "0", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert "little girl" in out.stdout
    assert re.search(r"\d+ prompt \+ 12 generated tokens, finish: length", out.stderr)


def test_invalid_option_is_a_clear_error():
    out = run("generate", "hi", "--temperature", "9")
    assert out.returncode == 2 and "temperature must be in [0, 5]" in out.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^    (python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) >= 2, "the README opens with the run command and the test command"
    assert commands[1] in ci


def test_unknown_replica_routing_is_a_clear_error(tmp_path):
    out = run("serve", "--replicas", "2", "--replica-routing", "fastest", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "--replica-routing must be one of affinity, ray, round-robin" in out.stderr
