"""The per-client-address accounting behind the server's connection limits
(specexec_rt/serving/client_limits.py), on a fake clock: who is admitted, which heads are
pending, parked, promoted or timed out, how the head deadline shortens under pressure."""
from __future__ import annotations

import threading

import pytest

from specexec_rt.serving.client_limits import (LINGER_PER_CLIENT, ClientTable, ConnectionLimits, client_key,
                                               fd_capacity)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def table(**limits) -> tuple[ClientTable, Clock]:
    clock = Clock()
    return ClientTable(ConnectionLimits(**limits), clock), clock


def connect(t: ClientTable, key: str, conn) -> tuple:
    """What the protocol does for a new connection: admit, count, start its head."""
    assert t.admit(key) is None
    t.opened(key)
    return t.head_started(key, conn)


def test_client_key_groups_what_one_host_controls():
    assert client_key(("10.1.2.3", 5555)) == "10.1.2.3"
    assert client_key(("::ffff:10.1.2.3", 5555, 0, 0)) == "10.1.2.3"           # IPv4-mapped: the IPv4 address
    a = client_key(("2001:db8:1:2:aaaa::1", 1, 0, 0))
    assert a == client_key(("2001:db8:1:2:ffff::9", 2, 0, 0)) == "2001:db8:1:2::/64"
    assert a != client_key(("2001:db8:1:3::1", 1, 0, 0))
    assert client_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert client_key(None) == client_key("") == ""                              # a Unix socket


def test_deadline_shortens_with_pressure():
    t, clock = table(head_timeout=10.0, min_head_timeout=2.0, max_client_pending_heads=4, max_connections=100)
    deadlines = [connect(t, "a", i)[0] for i in range(4)]
    # 1, 2, 3, 4 pending of a cap of 4: 10 - 8 * n / 4
    assert deadlines == [8.0, 6.0, 4.0, 2.0]
    assert t.deadline("b") == pytest.approx(10.0 - 8.0 * 4 / 50)     # the server's share: 4 of 100 // 2
    # Server-wide pressure alone: 50 pending heads over many addresses shorten everyone's.
    t, clock = table(head_timeout=10.0, min_head_timeout=2.0, max_client_pending_heads=None, max_connections=100)
    for i in range(50):
        connect(t, f"10.0.0.{i}", i)
    assert t.deadline("10.0.1.1") == 2.0
    # min_head_timeout above head_timeout never lengthens it
    t, _ = table(head_timeout=1.0, min_head_timeout=2.0)
    assert connect(t, "a", 0)[0] <= 1.0


def test_pending_heads_beyond_the_cap_are_parked_then_promoted_in_order():
    t, clock = table(max_client_pending_heads=2, head_timeout=10.0, min_head_timeout=10.0)
    assert connect(t, "a", "a0")[0] == 10.0 and connect(t, "a", "a1")[0] == 10.0
    for name in ("a2", "a3"):
        deadline, expired, promoted = connect(t, "a", name)
        assert (deadline, expired, promoted) == (None, [], [])             # parked: not to be read
    assert connect(t, "b", "b0")[0] == 10.0                                   # another address is not held up
    snap = t.snapshot()
    assert snap["pending_heads"] == {"a": 2, "b": 1} and snap["parked"] == {"a": 2}
    assert t.head_done("a", "a0") == [("a2", 10.0)]                          # the oldest parked first
    assert t.closed("a", "a1") == [("a3", 10.0)]
    assert t.head_done("a", "a2") == [] and t.snapshot()["parked"] == {}
    # A parked connection that gives up leaves the queue without taking a place.
    connect(t, "a", "a4")
    assert connect(t, "a", "a5")[0] is None
    assert t.head_done("a", "a5") == []
    assert t.snapshot()["pending_heads"]["a"] == 2 and t.snapshot()["counters"]["parked"] == 3


def test_heads_older_than_the_shortened_deadline_are_timed_out():
    """Heads that started under a long deadline are cut once pressure shortens it: whenever the
    address starts another head, its pending heads older than the deadline now are expired."""
    t, clock = table(max_client_pending_heads=4, head_timeout=10.0, min_head_timeout=2.0)
    connect(t, "a", "old")                       # deadline 8 s when alone
    clock.now += 3.0
    connect(t, "a", "mid")
    clock.now += 0.5
    assert connect(t, "a", "young") == (4.0, [], [])        # 3 pending of 4: 4 s; "old" is 3.5 s old
    clock.now += 1.0
    deadline, expired, promoted = connect(t, "a", "new")    # 4 of 4: 2 s; "old" (4.5 s) goes, "mid" (1.5 s) stays
    assert deadline == pytest.approx(10.0 - 8.0 * 3 / 4) and expired == ["old"]   # 3 left after the sweep
    assert t.snapshot()["counters"]["head_timeouts"] == 1
    t.head_done("a", "mid", timed_out=True)
    assert t.snapshot()["counters"]["head_timeouts"] == 2
    t.head_done("a", "mid", timed_out=True)                 # counted once
    assert t.snapshot()["counters"]["head_timeouts"] == 2


def test_admission_and_lingering_refusals():
    t, _ = table(max_connections=3, max_client_connections=2)
    connect(t, "a", "a0")
    connect(t, "a", "a1")
    assert "client address" in t.admit("a")
    connect(t, "b", "b0")
    assert "limit of 3 connections" in t.admit("c")
    t.closed("b", "b0")
    assert t.admit("c") is None and "client address" in t.admit("a")
    # Refusals linger (answered, then closed gracefully) up to a bound per address, then reset.
    assert all(t.refuse("a") for _ in range(LINGER_PER_CLIENT)) and not t.refuse("a")
    assert t.refuse("b")
    snap = t.snapshot()
    assert snap["lingering"] == {"a": LINGER_PER_CLIENT, "b": 1}
    assert snap["counters"]["refused"] == LINGER_PER_CLIENT + 2 and snap["counters"]["reset"] == 1
    t.linger_done("b")
    assert t.snapshot()["lingering"] == {"a": LINGER_PER_CLIENT}
    t2, _ = table(max_client_connections=None)
    for i in range(50):
        connect(t2, "a", i)
    assert t2.admit("a") is None


def test_wait_for_wakes_on_changes():
    t, _ = table()
    seen = threading.Event()
    waiter = threading.Thread(target=lambda: t.wait_for(lambda c: c["open"].get("a") == 1, 60) and seen.set())
    waiter.start()
    connect(t, "a", "a0")
    waiter.join(60)
    assert seen.is_set()
    assert not t.wait_for(lambda c: c["open"].get("a") == 2, 0.01)


@pytest.mark.parametrize("bad", [dict(max_connections=0), dict(max_connections=None), dict(max_client_connections=0),
                                 dict(max_client_pending_heads=1.5), dict(head_timeout=0), dict(min_head_timeout=-1),
                                 dict(head_timeout=float("inf")), dict(max_connections=True)])
def test_limits_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ConnectionLimits(**bad)


def test_fd_capacity_leaves_room(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert 0 < fd_capacity() < 1024 - 64
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert fd_capacity() is None


def test_connection_limit_fits_the_open_file_limit(monkeypatch, capsys):
    """The default is lowered to what ``ulimit -n`` holds without a word; a limit asked for
    explicitly is lowered with a warning."""
    from specexec_rt.serving import server

    monkeypatch.setattr(server, "fd_capacity", lambda: 500)
    assert server._fit_descriptors(None) == 500 and capsys.readouterr().err == ""
    assert server._fit_descriptors(10) == 10 and capsys.readouterr().err == ""
    assert server._fit_descriptors(2000) == 500 and "ulimit -n" in capsys.readouterr().err
    monkeypatch.setattr(server, "fd_capacity", lambda: None)
    assert server._fit_descriptors(None) == server.DEFAULT_MAX_CONNECTIONS
