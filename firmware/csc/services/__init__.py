"""One service per feature (MicroOcpp's Model/ layer): each registers its own commands
with `app.on(action, handler)` and gets `boot()` once, `online()` after each handshake and
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
    def __init__(self, app):
        self.app = app

    def boot(self):
        pass

    def online(self):
        pass

    def tick(self, now):
        pass


def get_security(app):
    """The certificate service, built on first use (it then registers its own handlers)."""
    s = app.sec
    if s is None:
        from .security import Security

        s = app.sec = Security(app)
        app.services.append(s)
    return s


def get_monitoring(app):
    """The monitor service (M3), built on its first command, or at boot when monitors are
    stored: a board that has none spends no heap on its code."""
    s = app.mon
    if s is None:
        from .monitoring import Monitoring

        s = app.mon = Monitoring(app)
        app.services.append(s)
    return s


def _on_first(app, action, build):
    def first(body, seq):
        build(app)  # registers the service's own handler for `action`, replacing this one
        return app.handlers[action](body, seq)

    return first


def load_all(app):
    from .auth import Auth
    from .config import Config
    from .smart_charging import SmartCharging
    from .transactions import Transactions

    app.cfg = Config(app)
    app.auth = Auth(app)
    app.sc = SmartCharging(app)
    app.tx = Transactions(app)
    app.services = [app.cfg, app.auth, app.sc, app.tx]
    try:
        from .admin import Admin
        from .firmware_update import FirmwareUpdate
    except ImportError:  # a build without them
        return
    from .station import Station

    app.fw = FirmwareUpdate(app)
    app.admin = Admin(app)
    app.station = Station(app)
    app.sec = None  # get_security(app)
    for a in CERT_ACTIONS:
        app.on(a, _on_first(app, a, get_security))
    app.services += [app.fw, app.admin, app.station]
    app.mon = None  # get_monitoring(app)
    if store.exists(store.path("mon")):
        get_monitoring(app)
    else:
        app.on(A_SET_MONITORS, _on_first(app, A_SET_MONITORS, get_monitoring))
        app.on(A_CLEAR_MONITORS, _on_first(app, A_CLEAR_MONITORS, get_monitoring))
