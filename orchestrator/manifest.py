"""The YAML manifest: parsing with line numbers, ``${VAR}`` expansion, validation,
and the resolved ``JobSpec`` each job runs from.

Every problem becomes one ``ManifestError`` line: ``FILE:LINE: FIELD: message``.
Nothing here touches the network or the state file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
import yarl
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.errors import InputError
from orchestrator.statuses import Phase, StatusMap, default_status_map

MAX_NODES = 1_000_000
# libyaml's parser where PyYAML has it (much faster on big manifests, same marks).
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Path_ = tuple[str | int, ...]


class ManifestError(InputError):
    def __init__(self, file: str, line: int, where: str, message: str) -> None:
        self.file, self.line, self.where = file, line, where
        prefix = f"{file}:{line}: " if line else f"{file}: "
        super().__init__(f"{prefix}{where + ': ' if where else ''}{message}")


# -------------------------------------------------------------------- the schema


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("must be a positive number")
    return float(value)


def _non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _job_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def http_url(value: Any) -> str:
    """An http(s) URL with a host, without a trailing slash; ValueError otherwise."""
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    try:
        host = yarl.URL(value).host  # the URL type the HTTP client sends with
        if host and host.replace(".", "").isdigit():  # yarl takes 256.1.1.1 as a name
            ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if not host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


def gateway_url(value: Any) -> str:
    """``http_url``, and not ending in ``/v1``: every path called starts with it."""
    url = http_url(value)
    if yarl.URL(url).path.rstrip("/").endswith("/v1"):
        raise ValueError(f"must not end in /v1: the calls add it (use {url[: -len('/v1')]})")
    return url


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
PositiveNumber = Annotated[float, BeforeValidator(_positive_number)]
Text = Annotated[str, BeforeValidator(_non_empty_string)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hyperparameters(BaseModel):
    """Known hyperparameters are type-checked; others pass through to the gateway."""

    model_config = ConfigDict(extra="allow", frozen=True)
    epochs: PositiveInt | None = None
    n_epochs: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    learning_rate: PositiveNumber | None = None
    learning_rate_multiplier: PositiveNumber | None = None


API = Literal["finetune", "fine_tuning"]  # the gateway's finetune flow, or OpenAI's shape
# Metadata keys the orchestrator tags each fine_tuning job with (``fine_tuning.TAGS``).
RESERVED_METADATA = "orchestrator_"


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's limits: at most 16 pairs (3 are ours), keys to 64 characters, values to 512."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("must map strings to strings")
    if len(value) > 13:
        raise ValueError("at most 13 pairs (the orchestrator adds 3 of its own)")
    for key, text in value.items():
        if not key or len(key) > 64 or len(text) > 512:
            raise ValueError(f"{key!r}: keys are 1-64 characters, values at most 512")
        if key.startswith(RESERVED_METADATA):
            raise ValueError(f"{key!r}: keys starting {RESERVED_METADATA!r} are the orchestrator's")
    return value


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and re.match(r"^[A-Za-z0-9-]+$", k) and isinstance(v, str)
        for k, v in value.items()
    ):
        raise ValueError("must map header names (letters, digits, '-') to strings")
    return value


class GatewaySection(_Strict):
    base_url: Annotated[str, BeforeValidator(gateway_url)] | None = None
    api_key: Text | None = None
    api: API | None = None  # every job's, unless a job or the defaults say otherwise
    auth: Literal["portkey", "bearer"] = "portkey"
    headers: Annotated[dict[str, str], BeforeValidator(_headers)] | None = None


class JobFields(_Strict):
    api: API | None = None
    provider: Text | None = None
    model: Text | None = None
    virtual_key: Text | None = None
    hyperparameters: Hyperparameters | None = None
    override_model: Text | None = None  # finetune only
    suffix: Text | None = None  # fine_tuning only, and the three below
    seed: PositiveInt | None = None
    metadata: Annotated[dict[str, str], BeforeValidator(_metadata)] | None = None
    validation_dataset: Text | None = None  # a local JSONL file, checked like the dataset


class JobSection(JobFields):
    name: Annotated[str, BeforeValidator(_job_name)]
    dataset: Text | None = None
    s3_key: Text | None = None


class ManifestSection(_Strict):
    gateway: GatewaySection | None = None
    defaults: JobFields | None = None
    statuses: dict[Phase, list[Text]] | None = None
    notify: list[Annotated[str, BeforeValidator(http_url)]] | None = None
    jobs: list[JobSection]


# ------------------------------------------------------------------ the result


@dataclass(frozen=True)
class JobSpec:
    """One job as the engine runs it: defaults merged, paths resolved."""

    name: str
    provider: str
    model: str
    virtual_key: str
    hyperparameters: dict[str, Any]
    override_model: str | None
    dataset_path: Path | None
    s3_key: str | None
    line: int = 0
    manifest: str = ""  # the manifest file it came from
    notify: tuple[str, ...] = ()  # URLs told when the job ends (not part of its spec)
    api: str = "finetune"  # the dialect: "finetune" or "fine_tuning"
    validation_path: Path | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None

    @property
    def dataset_name(self) -> str:
        """The ``name`` sent to the gateway: the file's name, as the API reference asks."""
        if self.dataset_path is not None:
            return self.dataset_path.name
        assert self.s3_key is not None
        return self.s3_key.rsplit("/", 1)[-1] or self.s3_key

    def fingerprint(self, content_sha256: str | None, validation_sha256: str | None = None) -> str:
        """What was applied: an edited spec or dataset (or validation dataset) changes it."""
        canonical: dict[str, Any] = {
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "virtual_key": self.virtual_key,
            "hyperparameters": self.hyperparameters,
            "override_model": self.override_model,
            "s3_key": self.s3_key,
            "dataset_name": self.dataset_name,
            "content_sha256": content_sha256,
        }
        if self.api != "finetune":  # so that a finetune job's fingerprint stays as it was
            canonical.update(api=self.api, suffix=self.suffix, seed=self.seed)
            canonical["metadata"] = self.metadata
            canonical["validation_sha256"] = validation_sha256
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    path: Path
    base_url: str | None
    api_key: str | None = field(repr=False)
    statuses: StatusMap
    jobs: tuple[JobSpec, ...]
    lines: Mapping[Path_, int] = field(default_factory=dict, repr=False)
    auth: str = "portkey"  # how the key is sent: x-portkey-api-key, or Authorization: Bearer
    # Sent with every gateway call; secrets.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


# ---------------------------------------------------------------- the loading


def load_manifest(path: Path, env: Mapping[str, str] | None = None) -> Manifest:
    env = os.environ if env is None else env
    shown = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(shown, 0, "", "no such file") from None
    except IsADirectoryError:
        raise ManifestError(shown, 0, "", "is a directory, not a manifest file") from None
    except OSError as exc:
        raise ManifestError(shown, 0, "", f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(shown, line, "", "not valid UTF-8") from None
    try:
        try:
            root = yaml.compose(text, Loader=_LOADER)
        except yaml.YAMLError:
            # Rare, so worth the pure-Python parser's clearer message and marks.
            root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "<stream end>" in problem and exc.context_mark is not None:
            mark = exc.context_mark  # an unclosed bracket: point where it was opened
            problem += f" ({exc.context} opened here)" if exc.context else ""
        line = mark.line + 1 if mark else 0
        raise ManifestError(shown, line, "", f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(shown, 0, "", f"YAML error: {exc}") from None
    if root is None:
        raise ManifestError(shown, 1, "", "manifest is empty; it needs a 'jobs' list")
    if not isinstance(root, MappingNode):
        raise ManifestError(shown, root.start_mark.line + 1, "", "manifest must be a mapping")
    builder = _Builder(shown, env)
    data = builder.build(root)
    return _validate(path, shown, data, builder.lines, env)


class _Builder:
    """Turns a composed YAML node tree into plain data, remembering each path's line."""

    def __init__(self, shown: str, env: Mapping[str, str]) -> None:
        self.shown, self.env = shown, env
        self.lines: dict[Path_, int] = {}
        self._scalars = yaml.SafeLoader("")  # constructs typed scalars: int, bool, ...
        self._budget = MAX_NODES

    def build(self, node: Node, at: Path_ = ()) -> Any:
        # Aliases share nodes, so a small file can expand exponentially ("billion laughs").
        self._budget -= 1
        if self._budget < 0:
            raise ManifestError(
                self.shown,
                node.start_mark.line + 1,
                _where(at, {}),
                f"manifest expands to more than {MAX_NODES} values (aliases?)",
            )
        self.lines.setdefault(at, node.start_mark.line + 1)
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, ScalarNode):
                    raise ManifestError(
                        self.shown, key_line, _where(at, {}), "keys must be strings"
                    )
                key = key_node.value
                if key in out:
                    raise ManifestError(
                        self.shown, key_line, _where((*at, key), {}), "duplicate key"
                    )
                self.lines[(*at, key)] = key_line
                out[key] = self.build(value_node, (*at, key))
            return out
        if isinstance(node, SequenceNode):
            return [self.build(item, (*at, i)) for i, item in enumerate(node.value)]
        value = self._scalars.construct_object(node)
        if isinstance(value, str) and "${" in value:
            value = _expand(value, at, node.start_mark.line + 1, self.shown, self.env)
        return value


def _expand(value: str, at: Path_, line: int, shown: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ManifestError(
            shown, line, _where(at, {}), f"environment variable {name} is not set (or empty)"
        )

    return _VAR.sub(substitute, value)


def _where(at: Path_, names: Mapping[int, str]) -> str:
    out = ""
    for i, part in enumerate(at):
        if isinstance(part, int):
            out += f"[{part}]"
            if i == 1 and at[0] == "jobs" and part in names:
                out += f" ({names[part]})"
        else:
            out += f".{part}" if out else part
    return out


def _line_of(at: Path_, lines: Mapping[Path_, int]) -> int:
    for cut in range(len(at), -1, -1):
        if at[:cut] in lines:
            return lines[at[:cut]]
    return 0


_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "enum": "is not a known phase",
}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        return str(error["msg"]).replace("Input should be", "must be")
    if kind == "enum":
        allowed = ", ".join(p.value for p in Phase)
        return f"is not a known phase (one of: {allowed})"
    return _MESSAGES.get(kind, str(error["msg"]))


def _validate(
    path: Path, shown: str, data: dict[str, Any], lines: dict[Path_, int], env: Mapping[str, str]
) -> Manifest:
    names = {
        i: job["name"]
        for i, job in enumerate(data.get("jobs") or [])
        if isinstance(job, dict) and isinstance(job.get("name"), str)
    }

    def fail(at: Path_, message: str, line: int | None = None) -> ManifestError:
        return ManifestError(shown, line or _line_of(at, lines), _where(at, names), message)

    try:
        section = ManifestSection.model_validate(data)
    except ValidationError as exc:
        first = sorted(exc.errors(), key=lambda e: _line_of(tuple(e["loc"]), lines))[0]
        loc = tuple(first["loc"])
        if first["type"] == "enum":  # a bad statuses key: point at the key itself
            loc = loc[:2]
        raise fail(loc, _message(first)) from None
    if not section.jobs:
        raise fail(("jobs",), "must list at least one job")

    gateway = section.gateway or GatewaySection()
    base_url = gateway.base_url
    if base_url is None and env.get("PORTKEY_BASE_URL"):
        try:
            base_url = gateway_url(env["PORTKEY_BASE_URL"])
        except ValueError as exc:
            raise ManifestError(shown, 0, "PORTKEY_BASE_URL", str(exc)) from None
    api_key = gateway.api_key or env.get("PORTKEY_API_KEY") or None

    defaults = section.defaults or JobFields()
    seen: dict[str, int] = {}
    jobs: list[JobSpec] = []
    for i, job in enumerate(section.jobs):
        at: Path_ = ("jobs", i)
        if job.name in seen:
            raise fail((*at, "name"), f"duplicate job name (first used by jobs[{seen[job.name]}])")
        seen[job.name] = i
        merged: dict[str, Any] = {}
        for key in JobFields.model_fields:
            merged[key] = getattr(job, key) or getattr(defaults, key)
        api = merged["api"] or gateway.api or "finetune"
        # A virtual key routes a finetune-flow job; the fine_tuning flow may route by
        # provider alone (or go straight to an OpenAI-compatible endpoint).
        required = (
            ("provider", "model", "virtual_key") if api == "finetune" else ("provider", "model")
        )
        for key in required:
            if not merged[key]:
                raise fail((*at, key), "required (in the job or in defaults)", lines.get(at))
        for key in _ONLY_FOR[_OTHER[api]]:
            if merged[key] is not None:
                where = (*at, key) if getattr(job, key) is not None else ("defaults", key)
                raise fail(where, f"only for api: {_OTHER[api]} (this job's api is {api})")
        if (job.dataset is None) == (job.s3_key is None):
            raise fail(at, "needs exactly one of 'dataset' (a local file) or 's3_key'")
        if api == "fine_tuning" and job.s3_key is not None:
            raise fail((*at, "s3_key"), "api: fine_tuning uploads a local file: use 'dataset'")
        dataset_path = None
        if job.dataset is not None:
            dataset_path = _local_file(path, job.dataset, (*at, "dataset"), fail)
        validation_path = None
        if merged["validation_dataset"] is not None:
            where = (*at, "validation_dataset") if job.validation_dataset else ("defaults",)
            validation_path = _local_file(path, merged["validation_dataset"], where, fail)
        hyper: dict[str, Any] = {}
        for source in (defaults.hyperparameters, job.hyperparameters):
            if source is not None:
                hyper.update(source.model_dump(exclude_none=True))
        jobs.append(
            JobSpec(
                name=job.name,
                provider=merged["provider"],
                model=merged["model"],
                virtual_key=merged["virtual_key"] or "",
                hyperparameters=hyper,
                override_model=merged["override_model"],
                dataset_path=dataset_path,
                s3_key=job.s3_key.lstrip("/") if job.s3_key else None,
                line=lines.get(at, 0),
                manifest=os.path.abspath(path),
                notify=tuple(section.notify or ()),
                api=api,
                validation_path=validation_path,
                suffix=merged["suffix"],
                seed=merged["seed"],
                metadata=merged["metadata"],
            )
        )
    statuses = default_status_map()
    if section.statuses:
        statuses = statuses.with_overrides(section.statuses)
    return Manifest(
        path=path,
        base_url=base_url,
        api_key=api_key,
        statuses=statuses,
        jobs=tuple(jobs),
        lines=lines,
        auth=gateway.auth,
        headers=tuple(sorted((gateway.headers or {}).items())),
    )


# The fields each dialect alone takes; the other dialect refuses them.
_ONLY_FOR = {
    "finetune": ("override_model",),
    "fine_tuning": ("suffix", "seed", "metadata", "validation_dataset"),
}


def _local_file(manifest: Path, given: str, at: Path_, fail: Any) -> Path:
    """A dataset path relative to the manifest's folder, kept as the user would write it
    in messages; a ManifestError when it is not a regular file."""
    found = Path(os.path.normpath(manifest.parent / given))
    if not found.exists():
        raise fail(at, f"file not found: {given}")
    if not found.is_file():
        raise fail(at, f"not a regular file: {given}")
    return found


_OTHER = {"finetune": "fine_tuning", "fine_tuning": "finetune"}
