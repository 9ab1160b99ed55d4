"""Knobs of the gateway simulator: timings, faults, and the seed that makes faults repeatable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_API_KEY = "sim-secret-key"

# What an odd answer can be. Before: the request is not handled. After: it is handled,
# then the answer is spoiled. GET only: a one-off 404, or the object without its fields.
ODD_ANSWERS = {
    "html_200": "before",  # an HTML page with 200, as a proxy's login or error page
    "html_502": "before",  # a proxy's HTML 502
    "cut_before": "before",  # JSON cut short; the gateway never acted
    "success_false": "before",  # {"success": false} with 200
    "cut_after": "after",  # the gateway acted, then its JSON was cut short
    "no_data": "after",  # {"success": true} without data
    "no_fields": "get",  # data without its id and status
    "not_found": "get",  # a one-off 404 for an object that exists
}


@dataclass
class SimConfig:
    api_key: str = DEFAULT_API_KEY
    bucket: str = "finetune-datasets"
    seed: int = 0
    # Added to every gateway request: fixed part plus a uniform random part.
    latency: float = 0.0
    latency_jitter: float = 0.0
    # Fault rates, each a probability per gateway request.
    error_rate: float = 0.0  # 500/502/503
    rate_limit_rate: float = 0.0  # 429 with Retry-After
    retry_after: float = 0.2
    drop_rate: float = 0.0  # connection dropped before the request is handled
    lost_response_rate: float = 0.0  # handled, then the connection dropped
    # Answers a real deployment may give that no documentation promises, each a
    # probability per gateway request; the kind is drawn from ``odd_answer_kinds``
    # (comma-separated, default all of ``ODD_ANSWERS``).
    odd_answer_rate: float = 0.0
    odd_answer_kinds: str = ""
    # How finetune statuses are spelled: "documented" (the strings in world.py),
    # "alternative" (other plausible spellings, double-l "successfull" included) or
    # "unknown" (a finished training reported with a string no map knows).
    status_spelling: str = "documented"
    error_shape: str = "string"  # how a finetune's error is given: "string" or "object"
    # A careless gateway: its 4xx messages quote the request's API key and the last
    # signed upload URL (the orchestrator must never store or show either).
    echo_secrets: bool = False
    storage_error_rate: float = 0.0  # 500/503 from the upload route
    storage_latency: float = 0.0  # before the upload route looks at a request
    # Lifecycle timings (seconds) and failure rates.
    validation_seconds: float = 2.0
    queue_seconds: float = 1.0
    training_seconds: float = 5.0
    validation_failure_rate: float = 0.0
    training_failure_rate: float = 0.0
    max_example_chars: int = 100_000  # longer examples fail validation, as providers do
    url_ttl: int = 900  # signed URL lifetime
    max_object_bytes: int = 5 * 1024**3

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown simulator setting: {name}")
            current = getattr(self, name)
            setattr(self, name, type(current)(value))

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("api_key")
        return data


# What each setting does, as `orchestrator sim --help` shows it.
HELP = {
    "api_key": "The x-portkey-api-key the simulated gateway accepts.",
    "bucket": "The bucket in the signed upload URLs.",
    "seed": "Seed of the random faults and failures (the same seed, the same faults).",
    "latency": "Seconds added to every gateway request.",
    "latency_jitter": "Up to this many more seconds, at random, per gateway request.",
    "error_rate": "Probability that a gateway request answers 500, 502 or 503.",
    "rate_limit_rate": "Probability that a gateway request answers 429 with Retry-After.",
    "retry_after": "The Retry-After seconds of those 429 answers.",
    "drop_rate": "Probability that a connection is dropped before the request is handled.",
    "lost_response_rate": "Probability that a request is handled, then its answer is lost.",
    "odd_answer_rate": "Probability of an answer no documentation promises (HTML, cut JSON, "
    "success: false with 200, no data or fields, a one-off 404).",
    "odd_answer_kinds": "Comma-separated kinds of odd answers to draw from (default all: "
    + ", ".join(ODD_ANSWERS)
    + ").",
    "status_spelling": "documented, alternative (other spellings of the same statuses) "
    "or unknown (finished trainings reported with a status no map knows).",
    "error_shape": "How a finetune's error is given: string, or object (message, code).",
    "echo_secrets": "4xx messages quote the request's API key and the last signed URL.",
    "storage_error_rate": "Probability that an upload answers 503 SlowDown.",
    "storage_latency": "Seconds before the upload route looks at a request.",
    "validation_seconds": "How long a dataset validation takes.",
    "queue_seconds": "How long a started finetune waits in the provider's queue.",
    "training_seconds": "How long a training takes.",
    "validation_failure_rate": "Probability that a valid dataset is rejected anyway.",
    "training_failure_rate": "Probability that a training fails.",
    "max_example_chars": "Longer examples fail validation, as providers' limits do.",
    "url_ttl": "Seconds a signed upload URL stays valid.",
    "max_object_bytes": "The largest object one upload may put.",
}
