"""One service per feature (MicroOcpp's Model/ layer), and here what every service is made of:
the `Service` base class, `refused()`, what a command handler raises, and the `status()`
answer most commands give.

Each feature is a module `<feature>.py` (the service: its state, what a tick runs, its urgent and
frequent commands) and, for most, `<feature>_cmds.py`, its cold half: the rare commands. A service
declares the commands it answers in `COMMANDS` (action, method name, …; constants, in flash on a
board) and gets `boot()` once, `online()` after each handshake and `tick(now_ms)` every app tick.
A name ".function" is a function(service, body, seq) of the feature's cold half, which is
therefore always the service's own module name + "_cmds": imported for that one command and
dropped again (`on_demand`).

This module imports no service and not the app: the services import it, the app builds them
(App._build_services), and no module imports one that imports it back (tests/test_fw_layout.py).
"""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from ..msgpack import FrameError, Map
from ..schema import E_REJECTED, F_REASON, F_STATUS


def refused(reason):
    """What a command handler raises when the command is impossible, `reason` saying why: the
    codec's FrameError with the code REJECTED, which the app answers with an error frame as the
    link answers a bad frame (an exception class of its own costs heap on a board)."""
    return FrameError(E_REJECTED, reason)


def status(code, reason=None):
    b = Map()
    b[F_STATUS] = code
    if reason:
        b[F_REASON] = reason
    return b


class Service:
    # the commands this service answers, flat: (action, name of the method, …); each method
    # takes (body, seq) and returns the response body or raises refused(); a name ".fn" is the
    # function fn(service, body, seq) of the feature's cold half (<feature>_cmds.py). The app
    # searches these tables (constants: in flash on a board) for an action's service: no table
    # in RAM.
    COMMANDS: tuple = ()

    def __init__(self, app):
        self.app = app
        app.services.append(self)

    def command(self, action, body, seq):
        c = self.COMMANDS
        name = c[c.index(action) + 1]
        if not name.startswith("."):
            return getattr(self, name)(body, seq)
        return on_demand(type(self).__module__ + "_cmds", name[1:], self, body, seq)

    # boot(), online() and tick(now): nothing unless the service says otherwise; one function for
    # the first two (a function object each costs heap on the board); tick() its own, without
    # `*args` (a call through `*args` makes a tuple, and tick() runs every 50 ms)
    def boot(self):
        pass

    online = boot

    def tick(self, now):
        pass


def on_demand(module, fn, service, body, seq):
    """fn(service, body, seq) of the module `module` of this package (its dotted name: a
    feature's cold half), imported for this one command and dropped again: a rare command's
    code takes heap only while it runs. Nothing may keep a reference into the module afterwards."""
    import sys

    m = __import__(module, None, None, (fn,))
    try:
        return getattr(m, fn)(service, body, seq)
    finally:
        sys.modules.pop(module, None)
        pkg = sys.modules[__name__]
        short = module[len(__name__) + 1 :]
        if hasattr(pkg, short):  # the import made it an attribute of this package too
            delattr(pkg, short)
