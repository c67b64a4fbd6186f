"""The live view (`confide dashboard`): its JSON and event stream over the stores of real runs, the token
rule, read-only reading beside a run that writes, and the page in a real browser (headless Chromium) during a
run."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide import config as config_module
from confide.cli import main
from confide.dashboard import Dashboard
from confide.dashboard.reader import RunReader
from confide.dashboard.serve import resolve_token
from confide.errors import ConfigError
from confide.runtime.runner import NullObserver, Runner
from confide.runtime.store import Store
from tests.conftest import tiny_config, write_corpus

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "a-test-token-of-24-chars"

# Site-level DP, so that the ledger moves; a budget, so that the page draws its line.
DP = {"privacy__dp": "'central'", "privacy__noise_multiplier": "0.8", "privacy__target_epsilon": "40.0"}


def _config(root: Path, name: str, rounds: int) -> config_module.Config:
    corpus = root / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    path = root / f"{name}.toml"
    text = tiny_config(corpus, root / "runs", run__rounds=str(rounds), **DP).replace("'tiny'", repr(name))
    path.write_text(text)
    return config_module.load(path)


class Beside:
    """A finished 2-round run, and what a reader that looked at its store all through the run saw."""

    def __init__(self, run_dir: Path, seen: list[int], looks: int) -> None:
        self.run_dir = run_dir
        self.seen = seen
        self.looks = looks


@pytest.fixture(scope="module")
def beside(tmp_path_factory: pytest.TempPathFactory) -> Beside:
    """A real 2-round run with site-level DP, read all through by the live view's reader in another thread
    (a look every few milliseconds: hundreds of times as often as a page does)."""
    root = tmp_path_factory.mktemp("dashboard")
    runner = Runner.start(_config(root, "done", 2))
    reader = RunReader(runner.store.run_dir)
    seen: list[int] = []
    looks = 0
    stop = threading.Event()

    def read() -> None:
        nonlocal looks
        cursor = None
        while not stop.wait(0.005):
            out, cursor = reader.look(cursor)
            seen.extend(r["round"] for r in out["rounds"])
            looks += 1

    thread = threading.Thread(target=read)
    thread.start()
    try:
        runner.run(NullObserver())
    finally:
        stop.set()
        thread.join()
        runner.close()
        reader.close()
    return Beside(root / "runs" / "done", seen, looks)


@pytest.fixture(scope="module")
def finished(beside: Beside) -> Path:
    return beside.run_dir


@pytest.fixture
def served(finished: Path) -> Iterator[Dashboard]:
    dashboard = Dashboard(finished, "127.0.0.1:0", poll=0.1)
    dashboard.start()
    yield dashboard
    dashboard.stop()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    # No proxy, whatever the environment says: the view is on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=120) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _updates(url: str, count: int, until: str | None = None) -> Iterator[dict[str, Any]]:
    """The first ``count`` updates of the event stream (or those up to one whose status is ``until``)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "api/stream", timeout=60) as stream:
        seen = 0
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                update = json.loads(line[6:])
                yield update
                seen += 1
                if seen >= count or (until is not None and update["status"] == until):
                    return


def test_the_state_holds_what_the_store_holds_and_no_path(served: Dashboard, finished: Path) -> None:
    status, body, headers = _get(served.url + "api/state")
    assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
    state = json.loads(body)
    store = Store.open(finished)
    try:
        assert state["reset"] and state["status"] == "finished"
        assert [r["round"] for r in state["rounds"]] == [1, 2]
        assert [r["train_loss"] for r in state["rounds"]] == [r["train_loss"] for r in store.rounds()]
        evaluations = dict(store.evaluations())
        for e in state["evaluations"]:
            for key in ("loss", "accuracy", "perplexity", "epsilon", "epsilon_amplified", "bytes_sent"):
                assert e[key] == evaluations[e["round"]][key]
        assert [c["epsilon"] for c in state["ledger"]] == [e for *_, e in store.ledger()]
        assert state["ledger"][0]["epsilon"] < state["ledger"][1]["epsilon"]
        assert [(s["round"], s["prompt"] + s["text"]) for s in state["samples"]] == [
            (r, p + t) for r, p, t in store.samples()
        ]
        assert len(state["samples"]) == 2 and all(len(s["text"]) == 20 for s in state["samples"])
        states = {s["site"]: (s["state"], s["round"]) for s in state["sites"]}
        assert states == {site: (st, r) for site, (st, r, _) in store.site_states().items()}
        took_part = {site for r in store.rounds() for site in r["sites"]}
        assert {s["site"] for s in state["sites"] if s["rounds"]} == took_part
        assert state["config"]["privacy.target_epsilon"] == 40.0
    finally:
        store.close()
    # The settings shown are a summary: no path of the run (the corpus, the output folder) reaches the page.
    assert "data.path" not in state["config"] and "run.output" not in state["config"]
    assert str(finished.parent.parent) not in body.decode()


def test_the_page_its_script_and_plotly_are_served_from_the_package(served: Dashboard) -> None:
    status, page, _ = _get(served.url)
    assert status == 200 and b'src="static/plotly.min.js"' in page and b'id="epsilon-now"' in page
    status, script, _ = _get(served.url + "static/dashboard.js")
    assert status == 200 and b"EventSource" in script
    status, plotly_js, headers = _get(served.url + "static/plotly.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert len(plotly_js) > 1_000_000 and b"plotly.js" in plotly_js[:200]
    assert _get(served.url + "static/../../run.sqlite")[0] == 404


def test_the_stream_sends_everything_then_only_what_is_new(served: Dashboard, finished: Path) -> None:
    stream = _updates(served.url, 2)
    first = next(stream)
    assert first["reset"] and [r["round"] for r in first["rounds"]] == [1, 2]
    store = Store.open(finished)  # a writer, as a resumed run would be
    try:
        store.event("note", "written after the page opened", 2)
        store.site_status([("site0", "refused", 3, "its update was not finite")])
    finally:
        store.close()
    second = next(stream)
    assert not second["reset"] and second["rounds"] == [] and second["ledger"] == []
    assert [e["message"] for e in second["events"]] == ["written after the page opened"]
    assert [(s["site"], s["state"], s["refused"]) for s in second["sites"]] == [("site0", "refused", 1)]


def test_beyond_loopback_the_view_needs_a_token(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="without a token: give --token generate"):
        resolve_token("0.0.0.0", None)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve_token("10.1.2.3", "short")
    assert resolve_token("127.0.0.1", None) is None and resolve_token("::1", None) is None
    drawn = resolve_token("0.0.0.0", "generate")
    assert drawn is not None and len(drawn) >= 16 and drawn != resolve_token("0.0.0.0", "generate")
    assert main(["dashboard", str(finished), "--listen", "0.0.0.0:0"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_every_request_carries_the_token(finished: Path) -> None:
    dashboard = Dashboard(finished, "127.0.0.1:0", token=TOKEN, poll=0.1)
    url = dashboard.start()
    base = url.split("?")[0]
    cookie = f"confide_dashboard_{dashboard.port}"
    try:
        assert url.endswith(f"?token={TOKEN}")
        assert _get(base + "api/state")[0] == 401
        assert _get(base + "api/state?token=wrong-token-of-24-chars!")[0] == 403
        assert _get(base + "api/state", {"Cookie": f"{cookie}=wrong"})[0] == 403
        assert _get(base + "api/state", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        status, _, headers = _get(url)  # the printed address: the page, and a cookie for what it loads
        assert status == 200 and f"{cookie}={TOKEN}" in headers["Set-Cookie"]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=strict" in headers["Set-Cookie"]
        assert _get(base + "api/state", {"Cookie": f"{cookie}={TOKEN}"})[0] == 200
    finally:
        dashboard.stop()


def test_without_a_token_only_loopback_names_are_served(served: Dashboard) -> None:
    # A page elsewhere that rebinds its own DNS name to 127.0.0.1 sends its own name as Host.
    assert _get(served.url + "api/state", {"Host": "attacker.example:8765"})[0] == 403
    assert _get(served.url + "api/state", {"Host": "localhost:8765"})[0] == 200


def test_the_reader_cannot_write_and_a_run_goes_on_beside_it(beside: Beside) -> None:
    # The run finished every round with the reader looking all along, and the reader was told each round once.
    assert beside.looks > 10 and beside.seen == [1, 2]
    reader = RunReader(beside.run_dir)
    try:
        out, _ = reader.look(None)
        assert [r["round"] for r in out["rounds"]] == [1, 2] and out["status"] == "finished"
        assert reader._db is not None
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._db.execute("INSERT INTO events (time, kind, message) VALUES (0, 'x', 'y')")
    finally:
        reader.close()


def _browser(profile: Path) -> Any:
    """Headless Chromium from Debian's packages, driven through their chromedriver: nothing is downloaded."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "chromium and chromium-driver are not installed (`make test` installs them as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1600",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


class _WaitForThePage(NullObserver):
    """Holds the run after each evaluated round until the test has seen that round in the page, so that the
    page is seen to change while the run goes on, however fast the rounds are."""

    def __init__(self, rounds: int) -> None:
        self.shown = {r: threading.Event() for r in range(1, rounds + 1)}

    def evaluated(self, round: int, metrics: dict[str, Any]) -> None:
        self.shown[round].wait(timeout=60)


def test_a_browser_sees_the_rounds_and_the_epsilon_move_during_a_run(tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    rounds = 2
    config = _config(tmp_path, "live", rounds)
    run_dir = Path(config.run.output) / config.run.name
    run_dir.mkdir(parents=True)  # the view starts before the run has made its store
    dashboard = Dashboard(run_dir, "127.0.0.1:0", poll=0.1)
    url = dashboard.start()
    observer = _WaitForThePage(rounds)
    opened = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            runner = Runner.start(config)  # built while the browser starts; it runs once the page is open
            try:
                opened.wait(timeout=120)
                runner.run(observer)
            finally:
                runner.close()
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    driver = None
    try:
        driver = _browser(profile)
        driver.get(url)
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        wait.until(lambda d: d.find_element("id", "connection").text == "live")
        assert driver.find_element("id", "round-now").text == "–"
        opened.set()
        epsilons = []
        for r in range(1, rounds + 1):
            # (A run that failed ends the wait at once, and the assertion below says why.)
            wait.until(lambda d, r=r: failures or d.find_element("id", "round-now").text == str(r))
            wait.until(
                lambda d, r=r: failures or f"after round {r}" in d.find_element("id", "accuracy-round").text
            )
            assert not failures, failures
            epsilons.append(float(driver.find_element("id", "epsilon-now").text))
            observer.shown[r].set()
        thread.join(timeout=120)
        assert not failures and not thread.is_alive()
        wait.until(lambda d: d.find_element("id", "run-status").text == "finished")
        assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]  # the epsilon moved, up
        assert len(driver.find_elements("css selector", "#samples .sample")) == rounds
        assert len(driver.find_elements("css selector", "#plot-privacy .scatterlayer .trace")) >= 2
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []  # no script error, no resource refused by the page's security policy
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
    finally:
        opened.set()
        for event in observer.shown.values():
            event.set()
        thread.join(timeout=120)
        if driver is not None:
            driver.quit()
        dashboard.stop()
        shutil.rmtree(profile, ignore_errors=True)
    if os.environ.get("CONFIDE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CONFIDE_SCREENSHOT"])
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and pixels.std() > 10  # plots, text and panels; a blank page has a few colours


def test_a_store_of_schema_3_is_read_as_it_is_and_migrated_when_a_run_opens_it(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "old", "[run]\nname = 'old'\n")
    store.add_sites([("a", "a", 3, 1), ("b", "b", 3, 1)])
    store.record_round(1, ["a"], 3, 2.5, 10, 20, 0.1)
    store.close()
    db = sqlite3.connect(tmp_path / "old" / "run.sqlite")
    db.executescript(
        "DROP TABLE site_status; DROP TABLE samples;UPDATE meta SET value = '3' WHERE key = 'schema_version';"
    )
    db.commit()
    db.close()
    reader = RunReader(tmp_path / "old")  # read-only: it cannot migrate, and needs not
    out, _ = reader.look(None)
    reader.close()
    assert [r["round"] for r in out["rounds"]] == [1] and out["samples"] == []
    assert [(s["site"], s["state"]) for s in out["sites"]] == [("a", "not asked yet"), ("b", "not asked yet")]
    reopened = Store.open(tmp_path / "old")
    try:
        assert reopened.meta("schema_version") == "4"
        reopened.site_status([("a", "dropped", 2, "no answer")])
        reopened.record_sample(2, "To be", ", or not")
        assert reopened.site_states() == {"a": ("dropped", 2, "no answer")} and reopened.samples() == [
            (2, "To be", ", or not")
        ]
    finally:
        reopened.close()
