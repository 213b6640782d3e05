"""Shared fixtures: real servers on loopback, started in-process on free ports."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch may import it early: set it
# before anything else so the kernel tests run in the interpreter on CPU tensors. (The GPU test
# reruns the compiled kernel in a fresh process with TRITON_INTERPRET=0.)
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.calibration.data import default_data_dir
from server.settings import ServerSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = default_data_dir()  # NEURONSERVE_DATA_DIR, else ../shared/data, as the server reads it

# Small limits keep the suite fast; tests that need others start their own server.
TEST_SETTINGS = dict(max_model_len=512, max_tokens=256, max_batch_size=8, max_queued_requests=64,
                     prefill_chunk_tokens=64, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, **overrides) -> None:
        self.settings = ServerSettings(**{**TEST_SETTINGS, "port": _free_port(), **overrides})
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port,
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.settings.port}"

    @property
    def state(self):
        return self.app.state.server

    def start(self, timeout: float = 300.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextlib.contextmanager
def live_server(**overrides):
    server = LiveServer(**overrides).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server():
    with live_server() as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c
