from __future__ import annotations

import io
import json

import structlog

from orchestrator.logs import Redactor, configure_logging


def test_one_processor_redacts_keys_headers_and_signed_urls() -> None:
    stream = io.StringIO()
    redactor = Redactor()
    redactor.add_secret("sk-live-very-secret")
    configure_logging(redactor, json_lines=True, stream=stream)
    log = structlog.get_logger("t")
    log.info(
        "call",
        headers={"x-portkey-api-key": "sk-live-very-secret", "accept": "json"},
        url="http://h:1/b/k.jsonl?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA",
        note="the key sk-live-very-secret leaked into text",
    )
    try:
        raise ValueError("boom with sk-live-very-secret and https://s3/b/k?X-Amz-Signature=cafe")
    except ValueError:
        log.exception("failed")
    output = stream.getvalue()
    for secret in ("sk-live-very-secret", "deadbeef", "AKIA", "cafe"):
        assert secret not in output
    first = json.loads(output.splitlines()[0])
    assert first["headers"] == {"x-portkey-api-key": "***", "accept": "json"}
    assert first["url"] == "http://h:1/b/k.jsonl?<redacted>"
    assert first["timestamp"].endswith("Z")
    assert "ValueError" in output
