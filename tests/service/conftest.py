"""Fixtures for the service tests: a broker and a real `rlhf serve` process per test module, and a
headless chromium for the pages (the playground, the loop page).

One service per module keeps the suite fast (starting one takes seconds); modules whose
tests would disturb each other (broker outage, policy swaps) start their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as ChromeDriver
from service_helpers import ServiceProcess

from rlhf_loop.core.broker import EmbeddedBroker


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory):
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


@pytest.fixture(scope="module")
def start_service(tmp_path_factory, base_model_dir):
    """start_service(bootstrap, model_dir=<the embedded model>, **settings) -> ServiceProcess; every process
    started is stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(bootstrap: str, model_dir: str = base_model_dir, **settings: str) -> ServiceProcess:
        svc = ServiceProcess.start(tmp_path_factory.mktemp("service"), model_dir, bootstrap, **settings)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(scope="module")
def service(start_service, module_broker) -> ServiceProcess:
    """A service with API keys on and the admin API off (RLHF_ADMIN_KEY unset)."""
    return start_service(module_broker.bootstrap)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Headless on a machine with no display, GPU or outside network: without the networking flags
# chromium keeps dialling Google's services, each a refused connection on a closed network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,640")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's chromium driven by selenium (`make test` installs it), one per module."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make test` installs Debian's chromium and "
                    "chromium-driver (apt-get; no browser can be downloaded here)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeDriver(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
