"""A synchronous QMP session on top of QEMU's own ``qemu.qmp`` library.

Why this shape:

- ``qemu.qmp`` is QEMU's maintained client (greeting, capabilities
  negotiation, ids, error classes, events); snapfs does not hand-write the
  protocol.  It is asyncio-based.
- snapfs' operations are synchronous and run in worker threads: the FUSE
  adapter's trio loop hands them off and never runs one itself, and the
  CLI has no loop at all.  So QMP does not run on trio (the library is
  asyncio; trio-asyncio would tie the two loops together for a handful of
  commands), but on a private asyncio loop owned by the calling thread for
  the length of one session (``asyncio.Runner``).
- One loop and one connection per session, not a long-lived client:
  operations are rare (a snapshot now and then), connecting to a local
  UNIX socket takes about a millisecond, and QEMU serves one QMP client at
  a time on a socket, so holding it between operations would lock the
  user's own tools (``socat``, ``qmp-shell``) out.

Every step is bounded (connect, each command, disconnect): a QEMU that
hangs costs an operation seconds, never the mount.  Failures become
``QemuError`` (``QemuNotRunning`` when nothing listens on the socket: the
VM is offline).
"""

import asyncio
import errno
import logging
import os

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from ..errors import QemuError, QemuNotRunning, QemuTimeout

CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 10.0

# The library logs every failure it also raises (at ERROR); snapfs reports
# the raised error itself, once, as one line.  Left alone if the
# application configured the logger.
_LIBRARY_LOG = logging.getLogger("qemu.qmp")
if _LIBRARY_LOG.level == logging.NOTSET:
    _LIBRARY_LOG.setLevel(logging.CRITICAL + 1)

# connect() errors that mean "nobody listens here": no socket file, a stale
# socket whose QEMU is gone, or a path that is not a socket.
_NOT_LISTENING = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOTDIR}


class QmpSession:
    """``with QmpSession(path) as qmp: qmp.execute("query-block")``.

    Connects on entry (raises QemuNotRunning, QemuTimeout or QemuError),
    disconnects on exit.  Not thread-safe: one thread uses one session."""

    def __init__(self, socket_path, timeout=COMMAND_TIMEOUT, connect_timeout=CONNECT_TIMEOUT):
        self.path = os.path.abspath(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.guest_agent = None      # the attached agent's socket, set by running_qemu
        self._runner = None
        self._client = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        """Connect.  Raises QemuNotRunning, QemuTimeout, QemuError."""
        self._runner = asyncio.Runner()
        try:
            self._client = QMPClient("snapfs")
            self._run(self._client.connect(self.path), self.connect_timeout, "connecting")
        except BaseException:
            self._client = None
            self._close_loop()
            raise

    def close(self):
        if self._runner is None:
            return
        try:
            if self._client is not None:
                try:
                    self._run(self._client.disconnect(), self.connect_timeout, "disconnecting")
                except QemuError:
                    pass    # the session is over either way; the loop goes below
        finally:
            self._client = None
            self._close_loop()

    def execute(self, command, arguments=None):
        """The ``return`` of QMP command ``command``.  Raises QemuError with
        QEMU's own description of an error reply, QemuTimeout."""
        if self._client is None:
            raise QemuError(f"QMP {self.path}: session is not open")
        return self._run(self._client.execute(command, arguments), self.timeout,
                         f"running {command}")

    def _run(self, coroutine, timeout, doing):
        try:
            return self._runner.run(asyncio.wait_for(coroutine, timeout))
        except (asyncio.TimeoutError, TimeoutError):
            raise QemuTimeout(f"QEMU at {self.path} did not answer within {timeout:g} s while "
                              f"{doing} (is another client connected to its QMP socket?)"
                              ) from None
        except ConnectError as e:
            cause = e.exc
            if isinstance(cause, OSError) and cause.errno in _NOT_LISTENING:
                raise QemuNotRunning(f"QEMU is not running at {self.path}: "
                                     f"{os.strerror(cause.errno)}") from None
            raise QemuError(f"QEMU at {self.path}: {e}") from None
        except ExecuteError as e:
            raise QemuError(f"QEMU at {self.path}: {doing}: {e.error_class}: {e}") from None
        except (QMPError, OSError, EOFError) as e:
            raise QemuError(f"QEMU at {self.path}: {doing}: "
                            f"{e or type(e).__name__}") from None
        except AssertionError:
            # qemu.qmp's connect() asserts its own state once the greeting
            # is read: a QEMU that hangs up just then (it is exiting) fails
            # that assertion.  It is a hang-up like any other, which
            # live.connect() asks again about until QEMU is gone.
            raise QemuError(f"QEMU at {self.path}: {doing}: the connection ended "
                            f"mid-handshake") from None

    def _close_loop(self):
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()
