"""Commands written to ``<vm>/control/*``: one command per line.

The kernel splits a big write() into several FUSE write requests, and a
program may write one line in several write() calls, so requests are not
commands: each open file collects bytes, and every complete line is one
command.  A line still open when the file is closed (``printf NAME``, no
newline) runs at close; its error is close()'s.

A line is at most MAX_COMMAND_BYTES.  Past that, the open file takes no
more commands (EINVAL for this and every later write): the rest of the
line can not be told from a new command.
"""

import json

from ..errors import InvalidArgument

MAX_COMMAND_BYTES = 4096


def complete_lines(handle, data):
    """Append ``data`` to the open file's pending bytes; return the
    commands (str) completed by it, in order.  Raises InvalidArgument for
    a line that is too long (and from then on) or that is not UTF-8."""
    if handle.error is not None:
        raise handle.error
    pending = handle.pending
    pending += data
    lines = []
    start = 0
    while True:
        end = pending.find(b"\n", start)
        if end < 0:
            break
        lines.append(bytes(pending[start:end]))
        start = end + 1
    del pending[:start]
    if len(pending) > MAX_COMMAND_BYTES or any(len(l) > MAX_COMMAND_BYTES for l in lines):
        pending.clear()
        handle.error = InvalidArgument(f"a control command is one line of at most "
                                       f"{MAX_COMMAND_BYTES} bytes")
        raise handle.error
    return [decode(line) for line in lines]


def take_rest(handle):
    """The unterminated last line, if any, as a command (at close)."""
    if handle.error is not None or not handle.pending:
        return None
    line = bytes(handle.pending)
    handle.pending.clear()
    return decode(line)


def decode(line):
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidArgument("control commands are UTF-8 text") from None


def parse(command, text):
    """(operation, arguments) of one command line of control file ``command``.
    ``create`` and ``preview`` also take a JSON object on the line:
    ``{"name": ..., "description": ..., "disks": [...]}`` (a partial
    snapshot) and ``{"snapshot": S, "disks": {DISK: OTHER, ...}}`` (a
    custom preview).  Raises InvalidArgument."""
    if command in ("create", "preview") and text.startswith("{"):
        return command, _parse_json(command, text)
    if command == "create":
        name, _, description = text.partition(" ")
        return "create", (name or None, description.strip())
    if command in ("delete", "preview"):
        if not text:
            raise InvalidArgument(f"control/{command} needs a snapshot name")
        return command, (text,)
    if command == "clone":
        return command, parse_clone(text)
    return command, ()     # commit, undo: any text is ignored (``echo yes > commit``)


_JSON_KEYS = {"create": {"name", "description", "disks"}, "preview": {"snapshot", "disks"}}


def _parse_json(command, text):
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"control/{command}: not a JSON object: {e}") from None
    if not isinstance(doc, dict) or set(doc) - _JSON_KEYS[command]:
        raise InvalidArgument(f"control/{command}: a JSON object with keys "
                              f"{sorted(_JSON_KEYS[command])}")
    disks = doc.get("disks")
    if command == "create":
        name, description = doc.get("name"), doc.get("description", "")
        if not (name is None or isinstance(name, str)) or not isinstance(description, str) \
                or not (disks is None or isinstance(disks, list)
                        and all(isinstance(d, str) for d in disks)):
            raise InvalidArgument('control/create: "name" and "description" are strings, '
                                  '"disks" a list of disk names')
        return name or None, description, disks
    snapshot = doc.get("snapshot")
    if not isinstance(snapshot, str) or not snapshot or not (
            disks is None or isinstance(disks, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in disks.items())):
        raise InvalidArgument('control/preview: "snapshot" is a snapshot name, "disks" an '
                              'object of disk: snapshot name')
    return snapshot, disks


def parse_clone(text):
    """(snapshot, new VM) of a control/clone line: ``SNAPSHOT NEW_VM``,
    split at the last space (a snapshot name may hold spaces, as imported
    internal snapshots' do), or at a tab when the new VM's name holds
    spaces too (no name holds a tab).  Raises InvalidArgument."""
    snapshot, sep, new_vm = text.partition("\t") if "\t" in text else text.rpartition(" ")
    snapshot, new_vm = snapshot.strip(), new_vm.strip()
    if not sep or not snapshot or not new_vm:
        raise InvalidArgument("control/clone takes 'SNAPSHOT NEW_VM' (the snapshot to clone and "
                              "the new VM's name)")
    return snapshot, new_vm
