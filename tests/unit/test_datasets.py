from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import datasets
from orchestrator.datasets import inspect_dataset
from orchestrator.settings import CheckSettings
from tests.conftest import example_line, write_dataset


def lines_file(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), "utf-8")
    return path


def test_a_good_file_passes_and_is_hashed(tmp_path: Path) -> None:
    import hashlib

    path = write_dataset(tmp_path / "ok.jsonl", examples=12)
    report = inspect_dataset(path)
    assert report.ok and report.examples == 12
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def msg(*messages: dict[str, object]) -> str:
    return json.dumps({"messages": list(messages)})


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
        (json.dumps({"prompt": "x"}), "'messages' must be a non-empty list"),
        (msg(U, "text"), "messages[1] must be an object"),
        (msg({"content": "x"}, A), "messages[0] has no 'role'"),
        (msg({"role": "robot", "content": "x"}, A), "messages[0].role 'robot' is not one of"),
        (msg(U, {"role": "assistant", "content": ""}), "messages[1].content must be a non-empty"),
        (msg(U, {"role": "assistant", "content": 3}), "messages[1].content must be a non-empty"),
        (msg(U, {"role": "assistant", "content": "x", "mood": "happy"}), "unknown key 'mood'"),
        (msg(U, {"role": "assistant", "content": "x", "weight": 2}), "weight must be 0 or 1"),
        (msg(U, U), "no assistant message"),
    ],
)
def test_each_problem_names_file_and_line(tmp_path: Path, bad: str, expected: str) -> None:
    good = [example_line(i) for i in range(12)]
    path = lines_file(tmp_path, [*good[:4], bad, *good[4:]])
    report = inspect_dataset(path)
    assert not report.ok
    assert report.errors[0].startswith(f"{path}:5: ")
    assert expected in report.errors[0]


def test_optional_keys_are_accepted_and_same_roles_warn(tmp_path: Path) -> None:
    named = msg(
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a", "name": "x"},
        U,
        {"role": "assistant", "content": "b", "weight": 0},
        A,
    )
    path = lines_file(tmp_path, [named] * 10)
    report = inspect_dataset(path)
    assert report.ok
    assert report.warnings[0] == f"{path}:1: messages[2] repeats role 'user'"


def test_long_examples_warn(tmp_path: Path) -> None:
    path = lines_file(tmp_path, [example_line(i, "x" * 500) for i in range(10)])
    report = inspect_dataset(path, CheckSettings(long_example_chars=400))
    assert report.ok and "providers may reject it" in report.warnings[0]


def test_too_few_and_empty(tmp_path: Path) -> None:
    few = inspect_dataset(lines_file(tmp_path, [example_line(1)] * 3))
    assert few.errors == [f"{tmp_path / 'd.jsonl'}:3: only 3 examples; at least 10 are required"]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert "no examples" in inspect_dataset(empty).errors[0]


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bin.jsonl"
    good = "".join(example_line(i) + "\n" for i in range(12)).encode()
    path.write_bytes(good + b'{"messages": "\xff\xfe"}\n')
    report = inspect_dataset(path)
    assert report.errors[0].startswith(f"{path}:13: not valid UTF-8")


def test_a_huge_line_is_refused_without_holding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(datasets, "BLOCK", 256)
    good = [example_line(i) for i in range(12)]
    path = lines_file(tmp_path, [*good[:2], example_line(0, "y" * 5000), *good[2:]])
    report = inspect_dataset(path)
    assert report.errors == [f"{path}:3: line longer than 1000 bytes"]
    assert report.examples == 12  # the lines after it were still checked


def test_lines_split_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "BLOCK", 7)  # every line straddles many blocks
    path = write_dataset(tmp_path / "ok.jsonl", examples=15)
    report = inspect_dataset(path)
    assert report.ok and report.examples == 15


def test_many_errors_are_counted_not_all_listed(tmp_path: Path) -> None:
    report = inspect_dataset(lines_file(tmp_path, ["{"] * 50))
    assert len(report.errors) == datasets.MAX_REPORTED and report.more_errors == 30
    assert report.summary().endswith("(and 49 more problems)")


def test_parallel_ranges_report_what_one_pass_reports(tmp_path: Path) -> None:
    lines = [example_line(i) for i in range(400)]
    for at in (3, 150, 199, 200, 201, 399):  # around where a two-way split falls
        lines[at] = "{broken"
    lines[250] = msg(U, U, A)  # a warning, far from the first range
    path = lines_file(tmp_path, lines)
    one = inspect_dataset(path, workers=1)
    many = inspect_dataset(path, workers=3, parallel_bytes=1)
    assert many.errors == one.errors and len(one.errors) == 6
    assert many.warnings == one.warnings == [f"{path}:251: messages[1] repeats role 'user'"]
    assert (many.examples, many.sha256, many.size) == (one.examples, one.sha256, one.size)
