"""The guest agent (qemu-guest-agent), just enough to freeze and thaw the
guest's filesystems around a live snapshot.

Why a small client of its own: the agent speaks QMP-like JSON over the
``virtserialport`` QEMU exposes as a UNIX socket (``vm qemu-args
--guest-agent``), but without a greeting or capabilities negotiation, so
``qemu.qmp``'s client can't talk to it.  The channel is a byte pipe into
the guest that survives our connections: an answer we stopped waiting for
may still come, to us or to the next client.  So every exchange starts
with ``guest-sync-delimited`` and a fresh random id (the agent answers it
after a 0xFF byte, which also resets its parser), and anything read before
that answer is dropped.

Everything is bounded by one deadline per command: QEMU accepts the
connection whether or not an agent runs in the guest (a guest that has not
booted, or has no agent, simply never answers).  Synchronous, like the QMP
session: it runs in the operation's thread.
"""

import contextlib
import json
import logging
import os
import random
import select
import socket
import threading
import time

from ..errors import QemuError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "SNAPFS_AGENT_TIMEOUT"
DEFAULT_TIMEOUT = 5.0         # per command: freezing many filesystems takes a while
MAX_FREEZE = 10.0             # the longest the guest stays frozen, whatever hangs
_DELIMITER = b"\xff"
_MAX_REPLY = 1 << 20          # a reply is a small JSON object; more is a broken peer


class AgentError(QemuError):
    """The agent is not there, did not answer in time, or refused."""


def agent_timeout():
    """Seconds to wait for each agent command: ``$SNAPFS_AGENT_TIMEOUT`` or
    5 (the tests make it short)."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return max(0.05, float(value)) if value else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT


class GuestAgent:
    """``with GuestAgent(path) as ga: ga.execute("guest-fsfreeze-freeze")``.

    Thread-safe: the freeze timer thaws from another thread."""

    def __init__(self, socket_path, timeout=None):
        self.path = socket_path
        self.timeout = agent_timeout() if timeout is None else timeout
        self._sock = None
        self._buffer = b""
        self._lock = threading.Lock()

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise AgentError(f"guest agent at {self.path}: cannot connect: "
                             f"{e.strerror or e}") from None
        self._sock = sock

    def close(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def ping(self):
        """Sync only: is an agent there?  Raises AgentError."""
        with self._lock:
            self._sync(time.monotonic() + self.timeout)

    def execute(self, command, arguments=None):
        """Sync, then run ``command``; its ``return``.  Raises AgentError."""
        with self._lock:
            deadline = time.monotonic() + self.timeout
            self._sync(deadline)
            message = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            self._send(json.dumps(message).encode(), deadline, command)
            reply = self._reply(deadline, command)
            if "error" in reply:
                error = reply["error"]
                raise AgentError(f"guest agent at {self.path}: {command}: "
                                 f"{error.get('class')}: {error.get('desc')}")
            return reply.get("return")

    def _sync(self, deadline):
        token = random.randrange(1, 1 << 31)
        self._buffer = b""
        # A leading 0xFF makes the agent drop any half command it holds.
        self._send(_DELIMITER + json.dumps({"execute": "guest-sync-delimited",
                                            "arguments": {"id": token}}).encode(),
                   deadline, "guest-sync-delimited")
        while True:
            # The answer comes after a 0xFF: everything before it is stale.
            cut = self._buffer.find(_DELIMITER)
            if cut >= 0:
                self._buffer = self._buffer[cut + 1:]
                if self._reply(deadline, "guest-sync-delimited").get("return") == token:
                    return
                continue
            self._buffer = b""
            self._receive(deadline, "guest-sync-delimited")

    def _send(self, data, deadline, doing):
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(data + b"\n")
        except OSError as e:
            raise AgentError(f"guest agent at {self.path}: {doing}: "
                             f"{e.strerror or 'timed out'}") from None

    def _reply(self, deadline, doing):
        """The next JSON line."""
        while b"\n" not in self._buffer:
            self._receive(deadline, doing)
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line.strip(_DELIMITER + b" \r\t"))
        except ValueError:
            raise AgentError(f"guest agent at {self.path}: {doing}: not JSON: "
                             f"{line[:80]!r}") from None
        if not isinstance(reply, dict):
            raise AgentError(f"guest agent at {self.path}: {doing}: unexpected reply")
        return reply

    def _receive(self, deadline, doing):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self._sock], [], [], left)[0]:
            raise AgentError(f"guest agent at {self.path}: no answer to {doing} within "
                             f"{self.timeout:g} s (no agent running in the guest?)")
        try:
            data = self._sock.recv(65536)
        except OSError as e:
            raise AgentError(f"guest agent at {self.path}: {doing}: {e.strerror}") from None
        if not data:
            raise AgentError(f"guest agent at {self.path}: {doing}: connection closed")
        self._buffer += data
        if len(self._buffer) > _MAX_REPLY:
            raise AgentError(f"guest agent at {self.path}: {doing}: reply too long")


class Freeze:
    """What ``frozen_guest`` did: ``consistency`` is "frozen" only if the
    guest's filesystems were frozen from before the switch until
    ``switched()`` was called; else "crash", and ``reason`` says why.
    ``frozen_seconds`` is how long the guest's writes could stall: from
    asking the freeze (the guest syncs, then freezes its filesystems one by
    one) to the thaw's answer; None if it never froze."""

    def __init__(self):
        self.consistency = "crash"
        self.reason = None
        self.frozen_seconds = None
        self._frozen = False
        self._frozen_at = None
        self._thawed = threading.Event()

    def switched(self):
        """Call right after the snapshot switched: was the guest still frozen?"""
        if self._frozen and not self._thawed.is_set():
            self.consistency = "frozen"
        elif self._frozen:
            self.reason = "the freeze lasted too long and the guest was thawed before the switch"


@contextlib.contextmanager
def frozen_guest(agent_path, max_freeze=MAX_FREEZE, timeout=None):
    """Freeze the guest's filesystems through the agent at ``agent_path``
    (None: no agent) for the body, and thaw them after, always: also when
    the freeze failed or timed out (the guest may have frozen and answered
    late, as VDSM reasons), and after ``max_freeze`` seconds from a timer
    if the body hangs.  Never raises for the agent: without a freeze the
    snapshot is crash-consistent, and the yielded ``Freeze`` says so."""
    state = Freeze()
    if not agent_path:
        state.reason = "no guest agent is attached"
        yield state
        log.warning("the snapshot is crash-consistent: %s", state.reason)
        return
    agent = GuestAgent(agent_path, timeout)
    timer = None
    sent = False
    try:
        try:
            agent.open()
            agent.ping()          # nobody there: don't leave a freeze queued in the pipe
            sent = True
            asked = time.monotonic()
            agent.execute("guest-fsfreeze-freeze")
            state._frozen = True
            state._frozen_at = asked
            timer = threading.Timer(max_freeze, _thaw, (agent, state, "timer"))
            timer.daemon = True
            timer.start()
        except AgentError as e:
            state.reason = f"freeze failed: {e}"
        yield state
    finally:
        if timer is not None:
            timer.cancel()
        if sent:
            _thaw(agent, state, "after the switch")
        agent.close()
        if state.consistency != "frozen":
            log.warning("%s: the snapshot is crash-consistent: %s", agent_path, state.reason)


def _thaw(agent, state, when):
    if state._thawed.is_set():
        return
    state._thawed.set()
    try:
        agent.execute("guest-fsfreeze-thaw")
        if state._frozen_at is not None:
            state.frozen_seconds = round(time.monotonic() - state._frozen_at, 3)
    except AgentError as e:
        log.error("%s: thawing the guest (%s) failed: %s", agent.path, when, e)
