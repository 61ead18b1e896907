"""README stays true: its examples are the shipped example files, and they run."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mindtrace.jobs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "mindtrace" / "jobs" / "examples"


def _body(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(lines[2:]).strip()


@pytest.mark.parametrize("name", ["quickstart", "async_quickstart", "lifecycle", "scheduling", "schedules"])
def test_readme_shows_the_example_and_it_runs(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert _body(EXAMPLES / f"{name}.py") in readme
    assert f"python -m mindtrace.jobs.examples.{name}" in readme
    result = subprocess.run(
        [sys.executable, "-m", f"mindtrace.jobs.examples.{name}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "quickstart": "pending: 0",
        "async_quickstart": "resizing /img/2.png",
        "lifecycle": "s3://bucket",
        "scheduling": "SUCCEEDED JobStatus.CANCELLED",
        "schedules": "unscheduled: True",
    }
    assert expected[name] in result.stdout


#: The two commands the top of README gives: run the example, run the tests.
EXAMPLE_COMMAND = "pip install -e . && python -m mindtrace.jobs.examples.quickstart"
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest tests/jobs/'


def test_readme_top_gives_the_two_commands_and_ci_runs_the_test_one_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    assert first_block is not None
    assert first_block.group(1).strip().splitlines() == [EXAMPLE_COMMAND, TEST_COMMAND]
    assert readme.index(first_block.group(0)) < readme.index("## Install")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in ci_lines


def test_every_python_block_in_the_readme_compiles_and_imports_only_public_names() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "mindtrace.jobs":
                for alias in node.names:
                    assert alias.name in mindtrace.jobs.__all__, f"README imports {alias.name}, not exported"
