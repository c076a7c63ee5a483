"""Fixtures for the service tests: a broker and a real `rlhf serve` process per test module.

One service per module keeps the suite fast (starting one takes seconds); modules whose
tests would disturb each other (broker outage, policy swaps) start their own.
"""

from __future__ import annotations

import pytest
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
