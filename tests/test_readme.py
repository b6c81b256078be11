"""The README's set-up commands are the truth: .ci/run runs the test command, the demo runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must start with a bash block"
    assert text.index(block.group(0)) < 40, "the commands must be the README's first lines"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_two_commands_install_demo_and_tests():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "pip install" in cmds[0] and cmds[0].endswith("onnxprune demo")
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


def test_demo_runs_and_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "zoo"))
    out = tmp_path / "demo.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune.cli", "demo", "--ep", "cpu", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[-1] == "PASSED"
    assert "MACs" in proc.stdout and "speedup" in proc.stdout
    assert out.exists()
