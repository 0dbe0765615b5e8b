"""One service per feature (MicroOcpp's Model/ layer): each registers its own commands
(`COMMANDS`, answered by `command()`) and gets `boot()` once, `online()` after each handshake and
`tick(now_ms)` every app tick."""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.

from .. import store
from ..schema import (
    A_CERTIFICATE_SIGNED,
    A_CLEAR_MONITORS,
    A_DELETE_CERTIFICATE,
    A_GET_INSTALLED_CERTIFICATES,
    A_INSTALL_CERTIFICATE,
    A_OCSP_RESPONSE,
    A_REVOKE_CERTIFICATE,
    A_SET_MONITORS,
)

# The certificate commands (security.py, M14–M19): rarely used, so the service is built on the
# first of them (or the first get_security()) and its code costs no heap before.
CERT_ACTIONS = (
    A_INSTALL_CERTIFICATE,
    A_DELETE_CERTIFICATE,
    A_GET_INSTALLED_CERTIFICATES,
    A_OCSP_RESPONSE,
    A_CERTIFICATE_SIGNED,
    A_REVOKE_CERTIFICATE,
)


class Service:
    # the commands this service answers, flat: (action, name of the method, …); each method
    # takes (body, seq) and returns the response body or raises app.Refused. The app searches
    # these tables (constants: in flash on a board) for an action's service: no table in RAM.
    COMMANDS: tuple = ()

    def __init__(self, app):
        self.app = app
        app.services.append(self)

    def command(self, action, body, seq):
        c = self.COMMANDS
        name = c[c.index(action) + 1]
        i = name.find(".")
        if i < 0:
            return getattr(self, name)(body, seq)
        return on_demand(name[:i], name[i + 1 :], self, body, seq)

    def boot(self):
        pass

    def online(self):
        pass

    def tick(self, now):
        pass


def on_demand(module, fn, service, body, seq):
    """fn(service, body, seq) of the module `module` of this package, imported for this one
    command and dropped again: a rare command's code takes heap only while it runs (a
    COMMANDS entry "module.fn"). Nothing may keep a reference into the module afterwards."""
    import sys

    name = __name__ + "." + module
    m = __import__(name, None, None, (fn,))
    try:
        return getattr(m, fn)(service, body, seq)
    finally:
        sys.modules.pop(name, None)
        pkg = sys.modules[__name__]
        if hasattr(pkg, module):  # the import made it an attribute of this package too
            delattr(pkg, module)


def get_security(app):
    """The certificate service, built on first use (it then registers its own commands)."""
    s = app.sec
    if s is None:
        from .security import Security

        s = app.sec = Security(app)
    return s


def get_monitoring(app):
    """The monitor service (M3), built on its first command, or at boot when monitors are
    stored: a board that has none spends no heap on its code."""
    s = app.mon
    if s is None:
        from .monitoring import Monitoring

        s = app.mon = Monitoring(app)
    return s


def lazy(app, action):
    """The service built on its first command that answers `action`, built now; or None."""
    if not hasattr(app, "sec"):  # a build without them (load_all)
        return None
    if action in CERT_ACTIONS:
        return get_security(app)
    if action == A_SET_MONITORS or action == A_CLEAR_MONITORS:  # noqa: PLR1714, SIM109 — two int compares
        return get_monitoring(app)
    return None


def load_all(app):
    from .auth import Auth
    from .config import Config
    from .smart_charging import SmartCharging
    from .transactions import Transactions

    app.cfg = Config(app)
    app.auth = Auth(app)
    app.sc = SmartCharging(app)
    app.tx = Transactions(app)
    try:
        from .admin import Admin
        from .firmware_update import FirmwareUpdate
    except ImportError:  # a build without them
        return
    from .station import Station

    app.fw = FirmwareUpdate(app)
    app.admin = Admin(app)
    app.station = Station(app)
    app.sec = None  # get_security(app), or lazy() on its first command
    app.mon = None  # get_monitoring(app), or lazy() on its first command
    if store.exists(store.path("mon")):
        get_monitoring(app)
