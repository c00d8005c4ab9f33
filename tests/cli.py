"""Checks shared by the tests that run an entry script as a user would."""

from __future__ import annotations


def assert_one_line_error(returncode: int, stderr: str, *fragments: str) -> None:
    """Non-zero exit, no traceback, and exactly one error line on stderr holding every fragment."""
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
