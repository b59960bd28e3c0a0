"""Test-only hooks that make interrupting a running conversion deterministic.

Nothing here does anything unless its environment variable is set; a normal ``moefy convert``
never sets them. They exist so that tests can signal a subprocess at a known point instead of
racing it with sleeps and polls (a tiny conversion can finish between a poll and the signal).

``MOEFY_TEST_PAUSE_AFTER_LAYER=N``
    The layer-wise stage blocks right after layer ``N``'s checkpoint is written to the work
    directory, until the process is signalled (SIGINT -> KeyboardInterrupt, SIGKILL, ...).
    As a safety net for orphaned test processes it gives up with an error after
    ``MOEFY_TEST_PAUSE_TIMEOUT`` seconds (default 600).
``MOEFY_TEST_PAUSED_FILE=path``
    With the above: once paused, the process writes its pid to ``path`` (atomically), so a test
    knows the process is blocked before it sends the signal.

A test uses :func:`pause_env` to build the environment and :func:`wait_until_paused` to wait.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

PAUSE_AFTER_LAYER = "MOEFY_TEST_PAUSE_AFTER_LAYER"
PAUSED_FILE = "MOEFY_TEST_PAUSED_FILE"
PAUSE_TIMEOUT = "MOEFY_TEST_PAUSE_TIMEOUT"


def pause_after_layer(i: int) -> None:
    """Called once layer ``i`` is saved; blocks when ``MOEFY_TEST_PAUSE_AFTER_LAYER`` names it."""
    want = os.environ.get(PAUSE_AFTER_LAYER, "").strip()
    if not want or int(want) != i:
        return
    ready = os.environ.get(PAUSED_FILE)
    if ready:
        tmp = Path(ready + ".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, ready)
    deadline = time.monotonic() + float(os.environ.get(PAUSE_TIMEOUT) or 600)
    while time.monotonic() < deadline:  # sleep() returns early (KeyboardInterrupt) on SIGINT
        time.sleep(0.5)
    raise RuntimeError(f"{PAUSE_AFTER_LAYER}={want}: paused after layer {i} but no signal came")


def pause_env(layer: int, paused_file: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) plus the variables that pause after ``layer``."""
    env = dict(os.environ if base is None else base)
    env.update({PAUSE_AFTER_LAYER: str(layer), PAUSED_FILE: str(paused_file)})
    return env


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without any of the test-hook variables."""
    env = dict(os.environ if base is None else base)
    for k in (PAUSE_AFTER_LAYER, PAUSED_FILE, PAUSE_TIMEOUT):
        env.pop(k, None)
    return env


def wait_until_paused(proc: subprocess.Popen, paused_file: str | Path, timeout: float = 600) -> None:  # type: ignore[type-arg]
    """Block until ``proc`` has written ``paused_file``; fail if it exits or ``timeout`` passes first."""
    paused_file = Path(paused_file)
    deadline = time.monotonic() + timeout
    while not paused_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before it paused")
        if time.monotonic() > deadline:
            raise AssertionError(f"process did not pause within {timeout} s")
        time.sleep(0.05)
