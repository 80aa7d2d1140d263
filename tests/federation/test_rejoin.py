"""The local phase sends its work again to a site whose process went away, once it is back."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from aldm_fed.federation import coordinator
from aldm_fed.federation.coordinator import SiteInfo


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(coordinator, "_hello_content", lambda cfg: RecordDict())  # the roll-call probe
    monkeypatch.setattr(coordinator.time, "sleep", lambda s: None)


class FakeGrid:
    """A grid whose sites answer from a script: per send, node -> "ok" | an error code | None
    (no reply); once the script is used up, nobody answers."""

    def __init__(self, script: list[dict[int, Any]]) -> None:
        self.script, self.sent = script, []
        self._ids = itertools.count()

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        answers = self.script.pop(0) if self.script else {}
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.sent.append(m.metadata.dst_node_id)
            answer = answers.get(m.metadata.dst_node_id)
            if answer == "ok":
                replies.append(Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=m))
            elif answer is not None:  # the SuperLink's own error, from its node id 1
                reply = Message(Error(code=answer, reason="node gone"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 1
                replies.append(reply)
        return replies


SITES = {11: SiteInfo(11, "A", 1, 1, 1), 12: SiteInfo(12, "B", 1, 1, 1)}


def _cfg(rejoin: float) -> Any:
    return OmegaConf.create({"fed": {"round_timeout_s": 60, "rejoin_wait_s": rejoin}})


def test_a_killed_site_gets_the_local_phase_again_when_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # B's process is gone; the roll-call probe finds it back on the second try; then it resumes.
    grid = FakeGrid([{11: "ok", 12: ErrorCode.NODE_UNAVAILABLE}, {12: ErrorCode.NODE_UNAVAILABLE},
                     {12: "ok"}, {12: "ok"}])
    replies = coordinator._ask_until_back(grid, _cfg(30), SITES, RecordDict())  # type: ignore[arg-type]
    assert grid.sent == [11, 12, 12, 12, 12]  # only B is asked again: probe, probe, the phase
    assert not replies[11].has_error() and not replies[12].has_error()


def test_a_site_whose_work_raised_is_not_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = FakeGrid([{11: "ok", 12: ErrorCode.CLIENT_APP_RAISED_EXCEPTION}])
    replies = coordinator._ask_until_back(grid, _cfg(30), SITES, RecordDict())  # type: ignore[arg-type]
    assert grid.sent == [11, 12] and replies[12].has_error()


def test_the_wait_for_a_lost_site_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = itertools.count(0.0, 5.0)
    monkeypatch.setattr(coordinator.time, "monotonic", lambda: next(clock))
    grid = FakeGrid([{11: "ok"}])  # B never answers, never comes back
    replies = coordinator._ask_until_back(grid, _cfg(30), SITES, RecordDict())  # type: ignore[arg-type]
    assert 12 not in replies and grid.sent[:2] == [11, 12] and set(grid.sent[2:]) == {12}  # probes only
    # rejoin_wait_s = 0: no wait at all
    grid = FakeGrid([{11: "ok", 12: ErrorCode.NODE_UNAVAILABLE}])
    coordinator._ask_until_back(grid, _cfg(0), SITES, RecordDict())  # type: ignore[arg-type]
    assert grid.sent == [11, 12]
