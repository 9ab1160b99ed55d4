"""The daemon's status page in a real browser (Debian's Chromium, driven by Playwright),
and the token that guards the page and the JSON."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator import SimulatorThread
from tests.acceptance.test_daemon import DaemonProcess, drop, manifest_jobs
from tests.conftest import cli_env, example_line, http, run_cli

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    """Chromium, or a visible skip where it cannot be had (never under CI=true)."""
    in_ci = os.environ.get("CI") == "true"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci:
            pytest.fail("playwright is missing: it is a dev dependency")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not shutil.which(CHROMIUM):
        if in_ci:
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def test_the_page_follows_jobs_filters_and_shows_a_failure(
    browser: Any, daemon: DaemonProcess, tmp_path: Path, sim: SimulatorThread
) -> None:
    sim.simulator.config.update({"training_seconds": 3.0, "max_example_chars": 2000})
    jobs = manifest_jobs(tmp_path, ["alpha", "bravo", "charlie"])
    with Path(jobs[2]["dataset"]).open("a") as handle:  # the provider rejects it
        handle.write(example_line(99, "x" * 3000) + "\n")
    daemon.start()
    page = browser.new_page()
    page.goto(daemon.url + "/")
    drop(tmp_path / "watch" / "team.yaml", jobs)
    page.wait_for_selector('tr[data-job="alpha"]', timeout=30_000)
    first = page.inner_text('tr[data-job="alpha"] td.state')
    assert first != "succeeded"  # seen moving, not finished already
    page.wait_for_selector(
        'tr[data-job="alpha"] td.state.succeeded', timeout=60_000
    )  # without a reload: the page updates itself
    page.wait_for_selector('tr[data-job="charlie"] td.state.failed', timeout=60_000)
    page.select_option("#state", "failed")
    shown = page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.job)")
    assert shown == ["charlie"]
    page.click('tr[data-job="charlie"] a')
    page.wait_for_selector("#job-error")
    assert "example longer than" in page.inner_text("#job-error")
    assert page.inner_text("#job-name") == "charlie"
    page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
    # Open on loopback only to loopback names (a rebinding page elsewhere gets nothing).
    assert http("GET", daemon.url + "/jobs", headers={"Host": "evil.example"})[0] == 403
    assert http("GET", daemon.url + "/jobs", headers={"Host": "localhost"})[0] == 200
    assert (tmp_path / "status-page.png").stat().st_size > 10_000


def test_off_loopback_needs_a_token_and_the_token_guards_everything(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    (tmp_path / "watch").mkdir()
    refused = run_cli(
        "daemon", "--watch", str(tmp_path / "watch"), "--listen", "0.0.0.0:0", env=cli_env()
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error: --listen 0.0.0.0:0: not a loopback address")
    token = tmp_path / "token"
    token.write_text("tok-5be1f0c8\n")
    daemon = DaemonProcess(
        tmp_path, sim, tmp_path / "daemon.log", ["--auth-token-file", str(token)]
    )
    try:
        daemon.start()
        assert http("GET", daemon.url + "/healthz")[0] == 200
        for path in ("/", "/jobs", "/metrics", "/jobs/x"):
            assert http("GET", daemon.url + path)[0] == 401, path
        bearer = {"Authorization": "Bearer tok-5be1f0c8"}
        status, body = http("GET", daemon.url + "/jobs", headers=bearer)
        assert status == 200 and json.loads(body) == []
        assert http("GET", daemon.url + "/jobs", headers={"Authorization": "Bearer no"})[0] == 401
        page = http("GET", daemon.url + "/", headers=bearer)
        assert page[0] == 200 and b"Fine-tune orchestrator" in page[1]
    finally:
        if daemon.process is not None:
            daemon.process.kill()
            daemon.process.wait()
