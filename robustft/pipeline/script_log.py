"""Script logging: stderr (and stdout) to the rule's log; a clear one-line message on the terminal on failure."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def rule_log(log_path: str | Path) -> Iterator[logging.Logger]:
    """Send this process's stderr and stdout to ``log_path`` for the block.

    On an exception, the full traceback goes to the log and one line ``robustft: <message>`` to the terminal's
    stderr, and the process exits with status 1.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    with open(log_path, "w", buffering=1) as log_file:
        saved = sys.stderr, sys.stdout
        os.dup2(log_file.fileno(), 2)
        sys.stderr = sys.stdout = log_file
        logger = logging.getLogger("robustft")
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield logger
        except BaseException as exc:  # report every failure, then leave with a non-zero status
            if isinstance(exc, SystemExit) and exc.code in (0, None):
                raise
            traceback.print_exc(file=log_file)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"robustft: {message} (log: {log_path})", file=terminal)
            log_file.flush()
            sys.exit(1)
        finally:
            logger.removeHandler(handler)
            sys.stderr, sys.stdout = saved
            os.dup2(terminal.fileno(), 2)
            terminal.close()
