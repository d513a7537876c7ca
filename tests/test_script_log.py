"""rule_log: output and tracebacks go to the rule's log; the terminal gets one ``robustft:`` line; exit status 1."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _run(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "logs" / "rule.log"
    script = textwrap.dedent(
        f"""
        import os, sys
        from robustft.pipeline.script_log import rule_log

        with rule_log({str(log)!r}) as log:
        """
    ) + textwrap.indent(textwrap.dedent(body), "    ")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return result, log


def test_failure_goes_to_the_log_and_one_line_to_the_terminal(tmp_path):
    result, log = _run(
        tmp_path,
        """
        log.info("starting the stage")
        print("progress on stdout")
        print("progress on stderr", file=sys.stderr)
        os.write(2, b"low-level stderr\\n")

        def inner():
            raise ValueError("the dataset root is missing\\nsecond line of detail")

        inner()
        """,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == f"robustft: the dataset root is missing (log: {log})"
    assert result.stdout == ""
    text = log.read_text()
    assert "starting the stage" in text
    assert "progress on stdout" in text and "progress on stderr" in text and "low-level stderr" in text
    assert "Traceback (most recent call last)" in text
    assert "in inner" in text
    assert "ValueError: the dataset root is missing" in text and "second line of detail" in text


def test_exception_without_a_message_names_its_type(tmp_path):
    result, log = _run(tmp_path, "raise KeyError\n")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"robustft: KeyError (log: {log})"]
    assert "KeyError" in log.read_text()


def test_nonzero_sys_exit_is_reported(tmp_path):
    result, log = _run(tmp_path, "sys.exit('bad input')\n")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"robustft: bad input (log: {log})"]


def test_success_writes_nothing_to_the_terminal(tmp_path):
    result, log = _run(
        tmp_path,
        """
        log.info("all good")
        print("to stderr", file=sys.stderr)
        """,
    )
    assert result.returncode == 0
    assert result.stderr == "" and result.stdout == ""
    text = log.read_text()
    assert "all good" in text and "to stderr" in text


def test_sys_exit_zero_is_a_success(tmp_path):
    result, _ = _run(tmp_path, "sys.exit(0)\n")
    assert result.returncode == 0
    assert result.stderr == ""


def test_stderr_is_restored_after_the_block(tmp_path):
    log = tmp_path / "rule.log"
    script = textwrap.dedent(
        f"""
        import sys
        from robustft.pipeline.script_log import rule_log

        with rule_log({str(log)!r}):
            print("inside", file=sys.stderr)
        print("after", file=sys.stderr)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr == "after\n"
    assert log.read_text() == "inside\n"
