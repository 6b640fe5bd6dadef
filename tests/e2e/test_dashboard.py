"""The dashboard in a real headless Chromium against `shoal dev --http-port N`: jobs with state and version,
a job's waves as progress bars and its failure budget, live updates without a reload, pause, resume and
canary promote, the executions table's keyset paging and state filter, the output panel, and the nodes.

Chromium is Debian's `chromium` package driven by Playwright (never `playwright install`); where either is
missing the test is skipped. The screenshot is saved under the test's tmp dir (or SHOAL_TEST_ARTIFACTS, if set) and its path printed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.devproc import running_dev

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHROMIUM = os.environ.get("SHOAL_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--no-proxy-server"]
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SIMULATED = 12
# Four waves of three simulated nodes, each wave healthy only after 4 intervals of 1 s: about 20 s in all,
# time enough to pause it and look.
ROLLING = {"name": "fleet-update", "type": "update", "config": {"command": ["true"], "simulate": {}},
           "selector": {"match_labels": {"simulated": "true"}},
           "rollout": {"strategy": "rolling", "max_parallel": 25, "max_failed_nodes": 2,
                       "health_check": {"interval": "1s", "success_threshold": 4, "failure_threshold": 2,
                                        "deadline": "60s"}}}
# A canary of one simulated node that waits for a promotion.
CANARY = {"name": "canary-update", "type": "update", "config": {"command": ["true"], "simulate": {}},
          "selector": {"match_labels": {"simulated": "true"}},
          "rollout": {"strategy": "canary", "max_parallel": 50, "canary": {"canary_count": 1},
                      "health_check": {"interval": "500ms", "success_threshold": 2, "failure_threshold": 2,
                                       "deadline": "60s"}}}
PIPE = {"name": "pipe", "type": "pipeline", "selector": {"match_labels": {"tier": "edge"}},
        "config": {"command": ["sh", "-c", "while true; do echo hello from the edge; sleep 1; done"]}}


def browser_or_skip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[browser]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with LOCAL.open(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> Any:
    """`shoal dev` with one real agent and a simulated fleet; yields the dashboard URL it prints."""
    browser_or_skip()
    data = tmp_path_factory.mktemp("dashboard") / "dev"
    with socket.socket() as probe:  # a free port, for --http-port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with running_dev(data, "--nodes", "1", "--simulate", str(SIMULATED), "--http-port", str(port),
                     wait_for={"dashboard": r"dashboard: (http://\S+)"}, clean_exit=False) as running:
        url = running.found["dashboard"]
        assert url == f"http://127.0.0.1:{port}/", (url, port)  # --http-port is the gateway's port
        yield url


def test_dashboard_shows_jobs_waves_live_updates_and_steers_a_rollout(dashboard: str, tmp_path: Path) -> None:
    sync_playwright = browser_or_skip()
    api = f"{dashboard}api/v1/namespaces/default"
    assert call("PUT", f"{api}/jobs", {"spec": PIPE})[0] == 200
    status, outcome = call("PUT", f"{api}/jobs", {"spec": ROLLING})
    assert status == 200 and outcome["accepted"], outcome
    assert call("PUT", f"{api}/jobs", {"spec": CANARY})[0] == 200
    artifacts = Path(os.environ.get("SHOAL_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The page forbids eval (CSP script-src 'self'); wait_for_function needs it, in the test only.
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(dashboard)

            # The jobs, with their state and version.
            page.wait_for_selector('#jobs tr[data-job="fleet-update"]', timeout=20_000)
            page.wait_for_selector('#jobs tr[data-job="pipe"]')
            assert page.inner_text('#jobs tr[data-job="fleet-update"] td.version') == "v1"
            assert page.get_attribute('#jobs tr[data-job="fleet-update"] .badge', "data-state") in (
                "pending", "queued", "deploying", "running")
            loaded_at = page.evaluate("window.shoalLoadedAt")

            # The job page: one bar per wave, the failure budget, the executions.
            page.click('#jobs tr[data-job="fleet-update"] a')
            page.wait_for_selector("#waves .wave", timeout=15_000)
            assert page.locator("#waves .wave").count() == 4
            assert page.get_attribute("#budget .budget", "data-limit") == "1"  # 10% of 12, below max_failed_nodes
            assert "failed of at most 1" in page.inner_text("#budget")  # the budget used against its limit
            page.wait_for_selector("#executions tr")
            page.wait_for_function("Number(document.getElementById('live').dataset.events) > 0", timeout=15_000)

            # A live update: the stream moves the rollout on screen, with no reload.
            events = int(page.get_attribute("#live", "data-events") or 0)
            page.wait_for_function(f"Number(document.getElementById('live').dataset.events) > {events}",
                                   timeout=15_000)

            # Pause, then resume, with the buttons; the API agrees, and the page never reloaded.
            page.wait_for_selector("#action-pause:not([disabled])", timeout=20_000)
            page.click("#action-pause")
            page.wait_for_selector('#rollout-facts[data-state="paused"]', timeout=10_000)
            assert call("GET", f"{api}/jobs/fleet-update/rollout")[1]["state"] == "paused"
            assert page.is_enabled("#action-resume") and page.is_disabled("#action-pause")
            page.click("#action-resume")
            page.wait_for_selector('#rollout-facts[data-state="deploying"], #rollout-facts[data-state="succeeded"]',
                                   timeout=10_000)
            assert call("GET", f"{api}/jobs/fleet-update/rollout")[1]["state"] in ("deploying", "succeeded")

            # Waves fill up as the rollout goes on, then it succeeds: all from the stream.
            page.wait_for_selector('#rollout-facts[data-state="succeeded"]', timeout=90_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#waves .wave')].every(w => w.classList.contains('started'))")
            # Each wave a progress bar: its nodes by state, as parts of the bar's width, which add up to it.
            assert page.locator("#waves .wave .bar span[data-count]").count() >= 4
            page.wait_for_function("[...document.querySelectorAll('#waves .wave .bar')].every(b => Math.round("
                                   "[...b.children].reduce((sum, s) => sum + parseFloat(s.style.width), 0)) === 100)")
            assert page.evaluate("window.shoalLoadedAt") == loaded_at, "the page reloaded"

            # Keyset paging and the state filter of the executions table.
            page.select_option("#exec-limit", "10")
            page.wait_for_function("document.querySelectorAll('#executions tr').length === 10")
            page.wait_for_selector("#exec-next:not([disabled])")
            first_ids = page.eval_on_selector_all("#executions tr", "rows => rows.map(r => r.dataset.id)")
            page.click("#exec-next")
            page.wait_for_function("document.getElementById('exec-page').textContent === 'page 2'")
            page.wait_for_function("document.querySelectorAll('#executions tr').length === 2")
            second_ids = page.eval_on_selector_all("#executions tr", "rows => rows.map(r => r.dataset.id)")
            assert not set(first_ids) & set(second_ids)
            assert page.is_disabled("#exec-next")
            page.click("#exec-first")
            page.select_option("#exec-state", "running")
            page.wait_for_function("[...document.querySelectorAll('#executions tr')]"
                                   ".every(r => r.dataset.state === 'running')")
            page.screenshot(path=str(shot), full_page=True)

            # The output panel of a job whose command prints.
            page.goto(f"{dashboard}#/jobs/pipe")
            page.wait_for_function("document.getElementById('output').textContent.includes('hello from the edge')",
                                   timeout=20_000)

            # A canary waits for its promotion; the promote button takes it on to the other waves.
            page.goto(f"{dashboard}#/jobs/canary-update")
            page.wait_for_selector('#rollout-facts[data-state="awaiting_promotion"]', timeout=30_000)
            assert page.is_enabled("#action-promote") and page.is_enabled("#action-abort")
            assert page.is_disabled("#action-pause") and page.is_disabled("#action-resume")
            page.click("#action-promote")
            page.wait_for_selector('#rollout-facts[data-state="deploying"], #rollout-facts[data-state="succeeded"]',
                                   timeout=10_000)
            assert page.is_disabled("#action-promote")
            assert call("GET", f"{api}/jobs/canary-update/rollout")[1]["state"] in ("deploying", "succeeded")

            # The nodes, with their labels and liveness.
            page.click("#nav-nodes")
            page.wait_for_selector('#nodes tr[data-node="node-1"]', timeout=10_000)
            assert page.locator("#nodes tr").count() == SIMULATED + 1
            assert "tier=edge" in page.inner_text('#nodes tr[data-node="node-1"]')
            assert page.inner_text('#nodes tr[data-node="sim-0001"] .badge') == "ready"
            assert not errors, errors
        finally:
            browser.close()
    print(f"\ndashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000
