from __future__ import annotations

import hashlib
import hmac
import json

from orchestrator.notify import events_for, signature
from orchestrator.states import JobRecord, State


def test_an_ending_owes_each_url_one_event_and_milestones_only_when_asked() -> None:
    done = JobRecord(name="a", fingerprint="f", state=State.SUCCEEDED, fine_tuned_model="ft:x")
    events = events_for(done, State.TRAINING, ("http://r/1", "http://r/2"), False)
    assert [e.url for e in events] == ["http://r/1", "http://r/2"]
    body = json.loads(events[0].body)
    assert body["event"] == "job.succeeded" and body["fine_tuned_model"] == "ft:x"
    assert events[0].body == events[1].body  # one event, told to each
    training = JobRecord(name="a", fingerprint="f", state=State.TRAINING)
    assert events_for(training, State.VALIDATED, ("http://r/1",), False) == []
    assert len(events_for(training, State.VALIDATED, ("http://r/1",), True)) == 1
    assert events_for(done, State.TRAINING, (), True) == []


def test_the_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"event": "job.failed"}'
    expected = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert signature(body, b"k") == f"sha256={expected}"
