"""The dashboard in a real browser: headless Chromium (tests/support/browser.py) against
`python -m eventbus dashboard` in a child process, over a store a real bus filled. It finds a
dead-lettered event, replays it through the page's form (with its CSRF token), and sees the
delivery succeed once a service recovers it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from eventbus import Event, EventBus, RetryPolicy
from eventbus.stores import SQLiteStore
from eventbus.testing import InlineExecutor
from tests.support.browser import WAIT, browser_paths, chrome
from tests.support.children import Children
from tests.support.net import free_port, wait_until_listening

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]


def run_bus(path: Path, *, failing: set[int]) -> list[str]:
    """A bus on the store at *path*: `send_email` fails for the orders in *failing* (one
    attempt, so they become dead letters), `audit` always succeeds. Emits orders 1 and 2 when
    the store is new; otherwise recovers and runs what is pending. Returns the emitted ids."""

    def send_email(event: Event) -> None:
        if event.payload["order_id"] in failing:
            raise ConnectionError("SMTP down")

    def audit(event: Event) -> None:
        pass

    fresh = not path.exists()
    bus = EventBus(
        store=SQLiteStore(path, create=fresh),
        executor=InlineExecutor(),
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        bus.subscribe("order:created", send_email, name="send_email")
        bus.subscribe("order:created", audit, name="audit")
        ids = [bus.emit("order:created", {"order_id": n}).id for n in (1, 2)] if fresh else []
        if not fresh:
            bus.recover()
        bus.drain()
        return ids
    finally:
        bus.close()


def state_of(driver: Any, handler: str) -> Any:
    """The state cell of *handler*'s row in the event page's deliveries table."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, f"//tbody/tr[td[1]='{handler}']/td[2]")


def test_find_replay_and_see_a_dead_letter_succeed(tmp_path: Path, children: Children) -> None:
    paths = browser_paths()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    store = tmp_path / "events.sqlite3"
    dead, ok = run_bus(store, failing={1})
    port = free_port()
    server = children.start(
        [sys.executable, "-m", "eventbus", "dashboard", "--store", str(store), "--port", str(port)],
        name="dashboard",
        stdin=False,
    )
    try:
        wait_until_listening(server, port)
        url = f"http://127.0.0.1:{port}"
        with chrome(paths=paths) as driver:
            wait = WebDriverWait(driver, WAIT)

            def shows(text: str) -> None:
                wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), text))

            # The overview: one row per handler.
            driver.get(f"{url}/")
            wait.until(ec.title_contains("Overview"))
            handlers = [
                a.text for a in driver.find_elements(By.CSS_SELECTOR, "tbody td:first-child a")
            ]
            assert sorted(handlers) == ["audit", "send_email"]

            # Search the dead-lettered event by its id, through the events page's form.
            driver.find_element(By.LINK_TEXT, "Events").click()
            wait.until(ec.title_contains("Events"))
            field = driver.find_element(By.NAME, "id")
            field.send_keys(dead)
            field.submit()
            wait.until(ec.url_contains(f"id={dead}"))
            found = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "tbody a")]
            assert found == [dead]
            assert ok not in driver.page_source

            # Its page: send_email is dead, audit succeeded.
            driver.find_element(By.LINK_TEXT, dead).click()
            wait.until(ec.title_contains(f"Event {dead}"))
            assert state_of(driver, "send_email").text == "dead"
            assert state_of(driver, "audit").text == "succeeded"
            shows("ConnectionError: SMTP down")

            # Its dead letter, found by the event id on the dead letters page.
            driver.find_element(By.LINK_TEXT, "Dead letters").click()
            wait.until(ec.title_contains("Dead letters"))
            field = driver.find_element(By.NAME, "event_id")
            field.send_keys(dead)
            field.submit()
            wait.until(ec.url_contains(f"event_id={dead}"))
            letters = driver.find_elements(By.CSS_SELECTOR, "tbody a[href^='/dead-letters/']")
            assert len(letters) == 1
            letter = letters[0].text
            letters[0].click()
            wait.until(ec.title_contains(f"Dead letter {letter}"))
            shows("Traceback (most recent call last)")

            # Replay: the POST form with its CSRF token, answered by a redirect saying so.
            driver.find_element(By.XPATH, "//button[text()='Replay']").click()
            wait.until(ec.presence_of_element_located((By.CLASS_NAME, "message")))
            message = driver.find_element(By.CLASS_NAME, "message").text
            assert message.startswith("1 dead letter(s) replayed."), message
            assert "No dead letters" in driver.page_source

            driver.get(f"{url}/events/{dead}")
            wait.until(ec.title_contains(f"Event {dead}"))
            assert state_of(driver, "send_email").text == "pending"

            # A service starts with send_email working again and runs the replayed delivery.
            assert run_bus(store, failing=set()) == []
            driver.refresh()
            wait.until(
                ec.text_to_be_present_in_element(
                    (By.XPATH, "//tbody/tr[td[1]='send_email']/td[2]"), "succeeded"
                )
            )
            assert state_of(driver, "audit").text == "succeeded"
    finally:
        server.close()
