"""One service per feature (MicroOcpp's Model/ layer): each registers its own commands
with `app.on(action, handler)` and gets `boot()` once, `online()` after each handshake and
`tick(now_ms)` every app tick."""

# ruff: noqa: PLC0415
# Imports inside functions are deliberate: on a board a module costs RAM only once it is needed.


class Service:
    def __init__(self, app):
        self.app = app

    def boot(self):
        pass

    def online(self):
        pass

    def tick(self, now):
        pass


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
    from .monitoring import Monitoring
    from .security import Security
    from .station import Station

    app.fw = FirmwareUpdate(app)
    app.admin = Admin(app)
    app.station = Station(app)
    app.sec = Security(app)
    app.mon = Monitoring(app)
    app.services += [app.fw, app.admin, app.station, app.sec, app.mon]
