"""The web dashboard (`GET /` of `dough serve`) in a real headless browser:
Debian's Chromium driven by Selenium (chromedriver), against the same real
daemon and VMs as the client's tests. Screenshots go to
target/artifacts/dashboard/ (DOUGH_ARTIFACTS)."""
import os
import re
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from dough import Dough

ARTIFACTS = Path(os.environ.get("DOUGH_ARTIFACTS", "target/artifacts/dashboard"))
# Bounds for things that happen on their own (a poll every 2 s, a VM's
# boot, a cancel's teardown), not expected times.
BOUND = 180


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1366,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    yield drv
    drv.quit()


def shot(b, name):
    b.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(b, what, cond):
    try:
        return WebDriverWait(b, BOUND, poll_frequency=0.2).until(lambda _: cond())
    except Exception:
        shot(b, "failed-" + re.sub(r"\W+", "-", what))
        raise AssertionError(f"{what}; page text:\n{b.find_element(By.TAG_NAME, 'body').text}")


def visible(b, id):
    return b.find_element(By.ID, id).is_displayed()


def test_log_in_follow_a_task_live_cancel_it_and_see_capacity(browser, daemon):
    b = browser
    b.get(daemon["url"] + "/")
    wait(b, "the login form", lambda: visible(b, "login"))
    # Keyboard: the token field takes the focus, Enter submits.
    b.find_element(By.ID, "token").send_keys("not-the-token", Keys.ENTER)
    wait(b, "the wrong token refused", lambda: "Wrong token" in b.find_element(By.ID, "login-error").text)
    assert not visible(b, "tasks")
    shot(b, "1-wrong-token")
    tok = b.find_element(By.ID, "token")
    tok.clear()
    tok.send_keys(daemon["token"], Keys.ENTER)
    wait(b, "the task list", lambda: visible(b, "tasks"))
    # The token lives in this tab's session storage only.
    assert b.execute_script("return sessionStorage.getItem('dough-token')") == daemon["token"]
    assert b.execute_script("return localStorage.length") == 0

    d = Dough(daemon["url"], daemon["token"])
    task = d.submit("echo hello-from-the-dashboard; sleep 600", labels={"suite": "dash"})
    row = f"tr[data-id='{task.id}']"
    wait(b, "the submitted task in the list", lambda: b.find_elements(By.CSS_SELECTOR, row))
    # The label filter keeps it, or not.
    f = b.find_element(By.ID, "f-label")
    f.send_keys("suite=other")
    wait(b, "the task filtered out", lambda: not b.find_elements(By.CSS_SELECTOR, row))
    f.clear()
    f.send_keys("suite=dash")
    wait(b, "the task filtered in", lambda: b.find_elements(By.CSS_SELECTOR, row))
    shot(b, "2-tasks")

    b.find_element(By.CSS_SELECTOR, f"{row} a").click()
    wait(b, "the task's page", lambda: visible(b, "task") and b.find_element(By.ID, "t-id").text == task.id)
    wait(
        b,
        "the live output",
        lambda: "hello-from-the-dashboard" in b.find_element(By.ID, "t-output").text,
    )
    # Live: it arrived while the task runs (it runs until cancelled).
    assert b.find_element(By.ID, "t-state").text == "running"
    shot(b, "3-task-running")

    b.find_element(By.ID, "t-cancel").click()
    wait(b, "the task cancelled", lambda: b.find_element(By.ID, "t-state").text == "cancelled")
    wait(
        b,
        "the cancel in the transitions",
        lambda: "cancelled" in b.find_element(By.ID, "t-transitions").text,
    )
    shot(b, "4-task-cancelled")

    # Resubmit: the same request again, as a new task, whose page opens.
    b.find_element(By.ID, "t-resubmit").click()
    wait(
        b,
        "the resubmitted task's page",
        lambda: b.find_element(By.ID, "t-id").text not in ("", task.id),
    )
    again = d.task(b.find_element(By.ID, "t-id").text)
    assert again.status()["request"]["command"] == task.status()["request"]["command"]
    wait(
        b,
        "the resubmitted task's output",
        lambda: "hello-from-the-dashboard" in b.find_element(By.ID, "t-output").text,
    )
    again.cancel()
    wait(b, "the resubmitted task cancelled", lambda: b.find_element(By.ID, "t-state").text == "cancelled")

    b.get(daemon["url"] + "/#/capacity")
    wait(
        b,
        "VMs in use against capacity",
        lambda: re.fullmatch(r"\d+ / \d+", b.find_element(By.ID, "c-vms").text),
    )
    wait(b, "the concurrency chart", lambda: "peak" in b.find_element(By.ID, "c-conc").get_attribute("innerHTML"))
    shot(b, "5-capacity")

    b.find_element(By.ID, "logout").click()
    wait(b, "logged out", lambda: visible(b, "login"))
    assert b.execute_script("return sessionStorage.getItem('dough-token')") is None
    d.close()
