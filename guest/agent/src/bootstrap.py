# ember's Python bootstrap: imports the function's handler, then serves invocations with the
# runtime protocol 2 (guest/abi/src/runtime.rs): frames on fd 3 (from the agent) and fd 4 (to it),
# stdout and stderr are the invocation's log.
#
# The handler is `def handler(event, context)`: `event` is the payload decoded from JSON (None when
# it is empty), the return value is encoded as JSON. `context` carries request_id, function_name,
# function_version, clone_id, memory_limit_in_mb and get_remaining_time_in_millis().
#
# The agent starts this before the template is taken, and the template is taken after READY: every
# clone starts with the interpreter up and the handler imported.

import importlib
import json
import os
import random
import struct
import sys
import time
import traceback

INVOKE, RESTORED, READY, RESULT, ERROR = 1, 2, 16, 17, 18
REQUESTS, REPLIES = 3, 4


def read_exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(REQUESTS, n - len(buf))
        if not chunk:
            # The agent went away: nothing more to serve.
            sys.exit(0)
        buf += chunk
    return bytes(buf)


def send(kind, body):
    data = memoryview(struct.pack("<II", kind, len(body)) + body)
    while data:
        data = data[os.write(REPLIES, data):]


def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def report(kind, exc, message=None, own=False):
    """An ERROR frame for `exc`, the bootstrap's own frames left out of its traceback (all of it
    when the bootstrap itself raised it: `own`)."""
    tb = None if own else exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    body = {
        "type": type(exc).__name__,
        "message": message if message is not None else str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
    }
    flush()
    send(kind, json.dumps(body).encode())


class Context:
    def __init__(self, fields, deadline_ns):
        self.request_id = str(fields.get("request_id", ""))
        self.function_name = str(fields.get("function", ""))
        self.function_version = str(fields.get("version", ""))
        self.clone_id = fields.get("clone_id")
        self.memory_limit_in_mb = fields.get("memory_mib")
        self._deadline_ns = deadline_ns

    def get_remaining_time_in_millis(self):
        return max(0, (self._deadline_ns - time.monotonic_ns()) // 1_000_000)

    def __repr__(self):
        return "Context(request_id=%r, function_name=%r, function_version=%r, clone_id=%r)" % (
            self.request_id, self.function_name, self.function_version, self.clone_id)


def load(spec):
    module_name, _, attr = spec.rpartition(".")
    module = importlib.import_module(module_name)
    try:
        handler = getattr(module, attr)
    except AttributeError:
        raise AttributeError("module %r has no attribute %r" % (module_name, attr)) from None
    if not callable(handler):
        raise TypeError("%s is not callable" % spec)
    return handler


def reseed():
    """A restored clone shares its template's memory: what was derived from randomness before the
    snapshot is the same in every clone. The kernel's RNG is reseeded by the agent; reseed ours."""
    random.seed()
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None


def invoke(handler, body):
    deadline_ns, context_len = struct.unpack_from("<QI", body)
    fields = json.loads(body[12:12 + context_len] or b"{}")
    raw = body[12 + context_len:]
    try:
        event = json.loads(raw) if raw.strip() else None
    except ValueError as e:
        return report(ERROR, e, "the event is not JSON: %s" % e, own=True)
    try:
        result = handler(event, Context(fields, deadline_ns))
    except BaseException as e:  # the clone keeps serving whatever the handler raised
        return report(ERROR, e)
    try:
        out = json.dumps(result).encode()
    except (TypeError, ValueError) as e:
        return report(ERROR, e, "the handler's return value cannot be encoded as JSON: %s" % e, own=True)
    flush()
    send(RESULT, out)


def main():
    sys.path[:0] = ["/var/task", "/opt/python"]
    # Line by line, as stderr is: the log keeps the order in which the handler wrote its lines.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        handler = load(os.environ.get("EMBER_HANDLER", ""))
    except BaseException as e:
        report(ERROR, e)
        sys.exit(1)
    flush()
    send(READY, ("python %s" % sys.version.split()[0]).encode())
    while True:
        kind, length = struct.unpack("<II", read_exact(8))
        body = read_exact(length)
        if kind == INVOKE:
            invoke(handler, body)
        elif kind == RESTORED:
            reseed()


main()
