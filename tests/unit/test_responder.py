"""The responder's control side without a kernel: what status says, where its files live,
how it is started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bpfilter import responder
from bpfilter.state import StateError


def test_status_lines() -> None:
    assert responder.Status(True, 42).line() == "REJECT responder: running, pid 42"
    assert "NOT RUNNING" in responder.Status(True, None).line()
    assert responder.Status(False, None).line() == "REJECT responder: not needed"
    assert responder.Status(True, 42, lost=3).line().endswith("3 events lost to a full ring")


def test_files_and_command_line() -> None:
    assert responder.pid_path("fw").name == "responder-fw.pid"
    assert responder.pid_path(None).name == "responder-host.pid"
    assert responder.log_path("fw").name == "responder-fw.log"
    assert responder._argv("fw") == [sys.executable, "-m", "bpfilter", "responder",
                                     "--netns", "fw"]
    assert responder._argv(None)[-1] == "responder"


def test_a_responder_that_cannot_start_fails_the_loading_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """REJECT without its responder would silently act as DROP: sync() raises instead,
    naming the reason the child gave."""
    monkeypatch.setattr(responder, "RUN_DIR", tmp_path)
    monkeypatch.setattr(responder, "ring_pins", lambda ns: [tmp_path / "ip-filter-g1-map-x"])
    monkeypatch.setattr(responder, "_argv", lambda ns: [
        sys.executable, "-c", "import sys; print('no raw sockets here', file=sys.stderr); "
        "sys.exit(3)"])
    with pytest.raises(StateError, match="did not start .*no raw sockets here"):
        responder.sync("fw")
    assert not responder.pid_path("fw").exists()


def test_nothing_to_start_without_a_reject_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responder, "ring_pins", lambda ns: [])
    assert responder.sync("fw") is None
