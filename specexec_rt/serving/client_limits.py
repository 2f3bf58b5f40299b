"""Per-client-address accounting of connections, so that one address cannot starve the others.

A client that opens many connections and sends each a partial request head (slowloris) holds
a connection per head for as long as the head deadline allows. With only a server-wide cap it
soon holds every slot, and everyone else gets a 503. ``ClientTable`` keeps, per client address
(an IPv4 address, or an IPv6 /64: one host can usually pick any address in its /64):

- its open connections, capped at ``max_client_connections``: a connection beyond the cap (or
  beyond the server-wide ``max_connections``) is refused with a 503 as it opens;
- its connections whose request line and headers are incomplete ("pending heads"), capped at
  ``max_client_pending_heads``: a connection beyond the cap is parked, unread (its bytes wait
  in the kernel, costing no CPU), until one of the address's pending heads completes or times
  out, oldest first; one parked for ``head_timeout`` is answered 503. Closing it instead would
  only invite the client to reconnect at once, a loop that costs the server far more than
  holding the connection; and a request of that address's own still gets in, in turn;
- the head deadline shortens under pressure: from ``head_timeout`` with no pending heads to
  ``min_head_timeout`` when the address holds its cap of pending heads (or the server holds
  ``max_connections // 2`` of them), and an address's pending heads older than its current
  deadline are timed out whenever it starts another.

Refused connections are answered and then closed gracefully (the client may already have sent
its request: closing with unread data would reset the connection and lose the answer), for
``linger`` seconds at most; a few per address and server-wide, beyond which they are reset at
once (``LINGER_PER_CLIENT``, ``LINGER_TOTAL``).

Only the event loop's thread changes a table; ``snapshot`` and ``wait_for`` may be called from
any thread (tests and monitoring).
"""
from __future__ import annotations

import collections
import ipaddress
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

DEFAULT_MAX_CONNECTIONS = 1024      # idle asyncio connections cost a few KiB each
DEFAULT_MAX_CLIENT_CONNECTIONS = 256
DEFAULT_MAX_CLIENT_PENDING_HEADS = 32
HEAD_TIMEOUT = 10.0
MIN_HEAD_TIMEOUT = 2.0
LINGER = 2.0
LINGER_PER_CLIENT = 8
LINGER_TOTAL = 64
FD_RESERVE = 128                    # descriptors kept for model files, threads, the listening socket


@dataclass(frozen=True)
class ConnectionLimits:
    """``None`` for a per-client cap turns it off (behind a reverse proxy every connection
    comes from the proxy's address: see docs/SERVER.md)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_client_connections: Optional[int] = DEFAULT_MAX_CLIENT_CONNECTIONS
    max_client_pending_heads: Optional[int] = DEFAULT_MAX_CLIENT_PENDING_HEADS
    head_timeout: float = HEAD_TIMEOUT
    min_head_timeout: float = MIN_HEAD_TIMEOUT
    linger: float = LINGER

    def __post_init__(self):
        for name in ("max_connections", "max_client_connections", "max_client_pending_heads"):
            value = getattr(self, name)
            if value is None and name != "max_connections":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int{' or None' if name != 'max_connections' else ''}, "
                                 f"got {value!r}")
        for name in ("head_timeout", "min_head_timeout", "linger"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def client_key(peername) -> str:
    """The address a client's connections are counted under: the IPv4 address (an IPv4-mapped
    IPv6 address as IPv4), the /64 of an IPv6 address, "" when unknown (a Unix socket)."""
    host = peername[0] if isinstance(peername, (tuple, list)) and peername else None
    if not isinstance(host, str):
        return ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def fd_capacity(reserve: int = FD_RESERVE) -> Optional[int]:
    """Connections this process can hold by its open-file limit (RLIMIT_NOFILE), with
    ``reserve`` descriptors and the lingering refusals left over; None where unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - reserve - LINGER_TOTAL)


class ClientTable:
    """Open connections, pending heads and lingering refusals per client address (module
    docstring). Connections are any hashable objects (the protocol instances)."""

    def __init__(self, limits: ConnectionLimits = ConnectionLimits(), clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self._open: collections.Counter = collections.Counter()
        self._pending: dict = {}        # key -> {conn: when its head started}, oldest first
        self._parked: dict = collections.defaultdict(dict)      # key -> {conn: None}, oldest first
        self._lingering: collections.Counter = collections.Counter()
        self._totals = {"open": 0, "pending": 0, "parked": 0, "lingering": 0}
        self.counters = {"opened": 0, "refused": 0, "reset": 0, "parked": 0, "head_timeouts": 0}
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ opening and closing
    def admit(self, key: str) -> Optional[str]:
        """None if a connection from ``key`` may open now, else why not (for the 503)."""
        lim = self.limits
        if self._totals["open"] >= lim.max_connections:
            return f"the server holds its limit of {lim.max_connections} connections; retry later"
        cap = lim.max_client_connections
        if cap is not None and self._open[key] >= cap:
            return f"this client address holds its limit of {cap} open connections; close some or retry later"
        return None

    def opened(self, key: str) -> None:
        with self._cond:
            self._open[key] += 1
            self._totals["open"] += 1
            self.counters["opened"] += 1
            self._cond.notify_all()

    def closed(self, key: str, conn) -> list:
        """``conn`` closed: the ``(connection, deadline)`` pairs promoted from parking."""
        with self._cond:
            self._unpend(key, conn)
            self._unpark(key, conn)
            self._open[key] -= 1
            self._totals["open"] -= 1
            if self._open[key] <= 0:
                del self._open[key]
            promoted = self._promote(key)
            self._cond.notify_all()
        return promoted

    def refuse(self, key: str) -> bool:
        """A refused connection from ``key``: True if it may linger (answer, then a graceful
        close), False if it must be reset at once (too many already linger)."""
        with self._cond:
            self.counters["refused"] += 1
            if self._lingering[key] >= LINGER_PER_CLIENT or self._totals["lingering"] >= LINGER_TOTAL:
                self.counters["reset"] += 1
                self._cond.notify_all()
                return False
            self._lingering[key] += 1
            self._totals["lingering"] += 1
            self._cond.notify_all()
            return True

    def linger_done(self, key: str) -> None:
        with self._cond:
            self._lingering[key] -= 1
            self._totals["lingering"] -= 1
            if self._lingering[key] <= 0:
                del self._lingering[key]
            self._cond.notify_all()

    # ------------------------------------------------------------------ request heads
    def head_started(self, key: str, conn) -> tuple[Optional[float], list, list]:
        """``conn`` (from ``key``) awaits a request head. Returns ``(deadline, expired,
        promoted)``: ``conn``'s head deadline in seconds, or None when the address holds its
        cap of pending heads and ``conn`` is parked (it must not be read until promoted);
        the address's pending heads older than the deadline the pressure now allows (to be
        timed out); and ``(parked connection, deadline)`` pairs promoted to pending heads."""
        now = self.clock()
        with self._cond:
            expired = []
            pending = self._pending.get(key, {})
            deadline = self.deadline(key, extra=1)
            while pending:                  # oldest first
                other, started = next(iter(pending.items()))
                if now - started <= deadline:
                    break
                expired.append(other)
                self._unpend(key, other)
                self.counters["head_timeouts"] += 1
            promoted = self._promote(key)
            if self._has_room(key) and not self._parked.get(key):
                self._pend(key, conn, now)
                own = self.deadline(key)
            else:
                self._parked[key][conn] = None
                self._totals["parked"] += 1
                self.counters["parked"] += 1
                own = None
            self._cond.notify_all()
        return own, expired, promoted

    def head_done(self, key: str, conn, timed_out: bool = False) -> list:
        """``conn``'s head is complete (or timed out, or ``conn`` left its parking): the
        ``(connection, deadline)`` pairs promoted from parking into the freed place."""
        with self._cond:
            if self._unpend(key, conn) and timed_out:
                self.counters["head_timeouts"] += 1
            self._unpark(key, conn)
            promoted = self._promote(key)
            self._cond.notify_all()
        return promoted

    def deadline(self, key: str, extra: int = 0) -> float:
        """The head deadline for ``key`` now (with ``extra`` more pending heads):
        ``head_timeout`` at no pressure, shrinking linearly to ``min_head_timeout`` as the
        address fills its cap of pending heads or the server holds ``max_connections // 2``
        of them."""
        lim = self.limits
        low = min(lim.min_head_timeout, lim.head_timeout)
        cap = lim.max_client_pending_heads
        mine = (len(self._pending.get(key, ())) + extra) / cap if cap is not None else 0.0
        everyone = (self._totals["pending"] + extra) / max(1, lim.max_connections // 2)
        pressure = min(1.0, max(mine, everyone))
        return lim.head_timeout - (lim.head_timeout - low) * pressure

    def _has_room(self, key: str) -> bool:
        cap = self.limits.max_client_pending_heads
        return cap is None or len(self._pending.get(key, ())) < cap

    def _pend(self, key: str, conn, now: float) -> None:
        self._pending.setdefault(key, {})[conn] = now
        self._totals["pending"] += 1

    def _promote(self, key: str) -> list:
        """Under the lock: parked connections of ``key`` (oldest first) into free places."""
        promoted = []
        parked = self._parked.get(key)
        while parked and self._has_room(key):
            conn = next(iter(parked))
            self._unpark(key, conn)
            self._pend(key, conn, self.clock())
            promoted.append((conn, self.deadline(key)))
        return promoted

    def _unpark(self, key: str, conn) -> bool:
        parked = self._parked.get(key)
        if parked is None or conn not in parked:
            return False
        del parked[conn]
        self._totals["parked"] -= 1
        if not parked:
            del self._parked[key]
        return True

    def _unpend(self, key: str, conn) -> bool:
        """Under the lock: ``conn`` no longer awaits a head; whether it did."""
        pending = self._pending.get(key)
        if pending is None or pending.pop(conn, None) is None:
            return False
        self._totals["pending"] -= 1
        if not pending:
            del self._pending[key]
        return True

    # ------------------------------------------------------------------ any thread
    def snapshot(self) -> dict:
        """Counts now: ``open``, ``pending_heads``, ``parked``, ``lingering`` per address
        (non-zero only), and ``counters`` since start: connections ``opened``, ``refused``
        (503 as they opened), ``reset`` (refused without an answer), ``parked``,
        ``head_timeouts``."""
        with self._cond:
            return {"open": dict(self._open), "pending_heads": {k: len(v) for k, v in self._pending.items()},
                    "parked": {k: len(v) for k, v in self._parked.items() if v}, "lingering": dict(self._lingering),
                    "counters": dict(self.counters)}

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot())`` holds (True) or ``timeout`` s pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.snapshot()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
