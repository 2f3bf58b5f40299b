"""What the server test modules share: the served tiny SpecExec engine and a server running it
on a loopback port in a background thread."""
from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

from conftest import build_tiny_model
from specexec_rt.serving.server import make_server
from specexec_rt.speculative.engine import Engine

MAX_LEN = 128
SPEC = dict(method="specexec", budget=6, beams_per_step=3, branch_width=2, max_depth=3)
TIMEOUT = 60.0


def make_engine(tok, **kw):
    """The served engine: SpecExec with a tiny random target (seed 0) and draft (seed 1)."""
    return Engine(build_tiny_model(seed=0, max_len=MAX_LEN), build_tiny_model(seed=1, max_len=MAX_LEN),
                  tokenizer=tok, **SPEC, **kw)


@contextmanager
def running(engine, **kw):
    """A server for ``engine`` (``make_server`` options ``kw``) serving until the block ends; on
    exit it must close (engine idle) and its thread end within TIMEOUT."""
    server = make_server(engine, "127.0.0.1", 0, model_name="tiny", **kw)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        assert server.close(timeout=TIMEOUT), "engine did not go idle at shutdown"
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def free_port() -> int:
    """A loopback port nothing listens on now (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
