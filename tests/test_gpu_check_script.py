"""scripts/gpu_check.sh's test steps, run on the CPU: one pytest per file, the deadline, the exit status.

The script is what a GPU machine runs (README, "On a GPU"); here it builds nothing, runs no sanitizer and no
benchmark, and its tests are two small files written for the purpose (one passes, one fails).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(out: Path, tests: list[Path] | str, deadline: int | None = None) -> subprocess.CompletedProcess:
    """gpu_check.sh on the CPU, test steps only; `tests`: files, or QUANTKERN_TESTS's text itself."""
    env = dict(os.environ, PYTHON=sys.executable, TORCH_CUDA_ARCH_LIST="8.9", QUANTKERN_SKIP_BUILD="1",
               QUANTKERN_SKIP_SANITIZERS="1", QUANTKERN_SKIP_BENCH="1", QUANTKERN_TESTS_PER_FILE="1",
               QUANTKERN_TESTS=tests if isinstance(tests, str) else " ".join(str(t) for t in tests))
    env.pop("QUANTKERN_DEADLINE_S", None)
    if deadline is not None:
        env["QUANTKERN_DEADLINE_S"] = str(deadline)
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def two_test_files(tmp_path: Path) -> list[Path]:
    passing = tmp_path / "test_passes.py"
    passing.write_text("def test_one():\n    assert 1 + 1 == 2\n\n\ndef test_two():\n    assert 'a' < 'b'\n")
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_wrong():\n    assert 1 + 1 == 3\n")
    return [passing, failing]


def summary_rows(stdout: str) -> dict[str, str]:
    """The summary table's rows after its 'step result' header: step name -> result."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split() == ["step", "result"])
    return {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in lines[start + 1:] if line.strip()}


def test_per_file_runs_each_file_and_fails_on_a_failing_one(tmp_path, two_test_files):
    out = tmp_path / "out"
    result = run_script(out, two_test_files)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = summary_rows(result.stdout)
    assert rows["info"].startswith("PASS")
    assert rows["tests:test_passes"].startswith("PASS")
    assert rows["tests:test_fails"].startswith("FAIL")
    # One log and one junit XML per file; pytest's last line of each in the summary.
    assert "2 passed" in (out / "tests_test_passes.log").read_text()
    assert "1 failed" in (out / "tests_test_fails.log").read_text()
    assert (out / "tests_test_passes.xml").is_file() and (out / "tests_test_fails.xml").is_file()
    assert (out / "tests_not_run.txt").read_text() == ""


def test_past_the_deadline_no_step_starts_and_the_files_are_listed(tmp_path, two_test_files):
    out = tmp_path / "out"
    result = run_script(out, two_test_files, deadline=0)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = summary_rows(result.stdout)
    assert rows == {"info": "NOT RUN (deadline)", "tests:test_passes": "NOT RUN (deadline)",
                    "tests:test_fails": "NOT RUN (deadline)"}
    assert (out / "tests_not_run.txt").read_text().split() == [str(f) for f in two_test_files]
    assert not (out / "tests_test_passes.log").exists()


def test_the_files_not_run_pass_on_to_the_next_call(tmp_path, two_test_files):
    first = tmp_path / "first"
    run_script(first, two_test_files, deadline=0)
    not_run = (first / "tests_not_run.txt").read_text()
    assert not_run.count("\n") == 2  # a file a line
    result = run_script(tmp_path / "second", not_run)
    rows = summary_rows(result.stdout)
    assert rows["tests:test_passes"].startswith("PASS") and rows["tests:test_fails"].startswith("FAIL")


def test_all_passing_files_exit_zero(tmp_path, two_test_files):
    result = run_script(tmp_path / "out", two_test_files[:1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_rows(result.stdout)["tests:test_passes"].startswith("PASS")


def test_a_missing_test_file_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, [tmp_path / "test_absent.py"])
    assert result.returncode == 1
    assert "takes test files; no file" in result.stderr
    assert not (out / "info.txt").exists()
