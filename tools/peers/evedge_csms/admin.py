"""The operator's command line: `evedge-csms-admin --data DIR COMMAND` (or `python -m evedge_csms.admin`).

Reads and writes the CSMS store directly (SQLite in WAL mode: safe beside the running
server). Commands it queues are sent by the running server to the site's gateway.

    list-stations
    list-sessions
    list-commands [--site S]
    list-forecasts --site S [--zone Z] [--all]
    list-boards --site S
    send-limit --site S --limit-w N [--zone Z] [--deadline-ms MS] [--available]
    firmware-campaign --site S --image FILE --version V --targets D [D ...] [--now]
    set-registration --site S --device D accepted|pending|rejected
    register-device --site S --device D
    revoke CERT_HASH [--reason R] | revoke-site --site S [--reason R] | revoke-server-certificate [--reason R]
    list-certificates | list-security-events
    deregister --site S --device D [--reason TEXT]
    migrate --site S --address HOST:PORT --cert FILE --targets D [D ...]
    add-token TOKEN [--status N] [--tariff ID]
    set-tariff --site S --id N --price-kwh P --currency EUR [--price-min P] [--price-session P]
    export-sdrs --format csv|json
    set-site --site S [--name N] [--address A] [--city C] [--postal-code P] [--country CC] [--lat X --lon Y]
             [--connector-standard S] [--connector-format F] [--power-type T] [--capabilities C ...]
    set-connector --site S --device D [--evse N] [--connector-standard S] [--connector-format F] [--power-type T]
                  [--meter-key HEX]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evedge_csms.api import Csms
from evedge_csms.config import load, provision
from evedge_csms.errors import CsmsError
from evedge_csms.inbound import Ctx
from evedge_csms.pki import Ca, load_or_create_signer
from evedge_csms.store import SqliteStore
from evedge_csms.wire import unix_time
from gateway.protocol import devpki
from gateway.schema import ResetWhen

SDR_FIELDS = (
    "sdr_id",
    "site_id",
    "device_id",
    "tx_id",
    "evse",
    "evse_gid",
    "id_token",
    "started",
    "stopped",
    "meter_start_wh",
    "meter_stop_wh",
    "energy_wh",
    "tariff_id",
    "currency",
    "cost",
    "signed_meter",
)


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str], out: TextIO) -> None:
    out.write("\t".join(cols) + "\n")
    for r in rows:
        out.write("\t".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + "\n")


def export_sdrs(api: Csms, fmt: str, out: TextIO) -> None:
    """SDRs with Unix times and signed meter data in hex."""
    rows = []
    for s in api.sdrs():
        row = {k: s[k] for k in SDR_FIELDS}
        row["started"], row["stopped"] = unix_time(s["started"]), unix_time(s["stopped"])
        row["signed_meter"] = [b.hex() for b in s["signed_meter"] or []]
        rows.append(row)
    if fmt == "json":
        json.dump(rows, out, indent=1)
        out.write("\n")
        return
    w = csv.DictWriter(out, fieldnames=SDR_FIELDS)
    w.writeheader()
    for row in rows:
        w.writerow({**row, "signed_meter": " ".join(row["signed_meter"])})


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    devpki.private_by_default()
    ap = argparse.ArgumentParser(prog="evedge-csms-admin", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the CSMS data folder")
    ap.add_argument("--config", type=Path, help="the CSMS config file (for policy and PKI paths)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list-stations")
    sub.add_parser("list-sessions")
    lc = sub.add_parser("list-commands")
    lc.add_argument("--site")
    lf = sub.add_parser("list-forecasts", help="E3: the site's forecast in force (--all: every one received)")
    lf.add_argument("--site", required=True)
    lf.add_argument("--zone", type=int)
    lf.add_argument("--all", action="store_true")
    lb = sub.add_parser("list-boards", help="M1: the site's boards and EVSEs, as it last reported them")
    lb.add_argument("--site", required=True)
    sl = sub.add_parser("send-limit")
    sl.add_argument("--site", required=True)
    sl.add_argument("--limit-w", type=int, required=True)
    sl.add_argument("--zone", type=int)
    sl.add_argument("--deadline-ms", type=int, default=5000)
    sl.add_argument("--available", action="store_true", help="E4 AvailablePower instead of an E5 DSO limit")
    fc = sub.add_parser("firmware-campaign")
    fc.add_argument("--site", required=True)
    fc.add_argument("--image", type=Path, required=True)
    fc.add_argument("--version", required=True)
    fc.add_argument("--targets", nargs="+", required=True)
    fc.add_argument("--now", action="store_true", help="install as soon as verified, ending a running session")
    sr = sub.add_parser("set-registration")
    sr.add_argument("--site", required=True)
    sr.add_argument("--device", required=True)
    sr.add_argument("registration", choices=("accepted", "pending", "rejected"))
    rg = sub.add_parser("register-device", help="M13: the station may onboard at its site (told at once)")
    rg.add_argument("--site", required=True)
    rg.add_argument("--device", required=True)
    rv = sub.add_parser("revoke", help="M19: revoke a certificate (a board's, a site's or the CSMS's TLS one)")
    rv.add_argument("cert_hash", help="SHA-256 of the DER, hex (list-certificates)")
    rv.add_argument("--reason", help="e.g. keyCompromise, cessationOfOperation (RFC 5280 names)")
    rs = sub.add_parser("revoke-site", help="M19: revoke every TLS certificate of a site's gateway")
    rs.add_argument("--site", required=True)
    rs.add_argument("--reason")
    rc = sub.add_parser("revoke-server-certificate", help="M19: revoke the CSMS's own TLS certificate")
    rc.add_argument("--reason")
    sub.add_parser("list-certificates", help="M19: the TLS certificates met (sites', the CSMS's own)")
    sub.add_parser("list-security-events", help="SecurityEvents of the boards and the sites")
    dr = sub.add_parser("deregister", help="M11: the station is removed (set-registration accepted takes it back)")
    dr.add_argument("--site", required=True)
    dr.add_argument("--device", required=True)
    dr.add_argument("--reason")
    mg = sub.add_parser("migrate", help="M12: the boards move to another site's gateway (its LAN host:port)")
    mg.add_argument("--site", required=True)
    mg.add_argument("--address", required=True)
    mg.add_argument("--cert", type=Path, help="the new gateway's local CSMS certificate (PEM/DER)")
    mg.add_argument("--targets", nargs="+", required=True)
    at = sub.add_parser("add-token")
    at.add_argument("token")
    at.add_argument("--status", type=int, default=0)
    at.add_argument("--tariff", type=int)
    st = sub.add_parser("set-tariff")
    st.add_argument("--site", required=True)
    st.add_argument("--id", type=int, required=True)
    st.add_argument("--price-kwh", type=int, required=True)
    st.add_argument("--currency", required=True)
    st.add_argument("--price-min", type=int)
    st.add_argument("--price-session", type=int)
    ss = sub.add_parser("set-site", help="R1-2: the site's record, published to the roaming partners as its location")
    ss.add_argument("--site", required=True)
    for opt in ("--name", "--address", "--city", "--postal-code", "--country"):
        ss.add_argument(opt)
    ss.add_argument("--lat", type=float)
    ss.add_argument("--lon", type=float)
    ss.add_argument("--capabilities", nargs="*")
    sc = sub.add_parser("set-connector", help="R1-2: one EVSE's connector, over its site's (a site mixing AC and DC)")
    sc.add_argument("--site", required=True)
    sc.add_argument("--device", required=True)
    sc.add_argument("--evse", type=int, default=1)
    sc.add_argument("--meter-key", type=bytes.fromhex,
                    help="R3-9: the meter's Ed25519 public key (hex, its label); \"\" clears it")  # fmt: skip
    for opt in ("--connector-standard", "--connector-format", "--power-type"):
        ss.add_argument(opt)
        sc.add_argument(opt)
    ex = sub.add_parser("export-sdrs")
    ex.add_argument("--format", choices=("csv", "json"), default="csv")
    args = ap.parse_args(argv)

    cfg = load(args.config, data_dir=args.data)
    provision(cfg)
    store = SqliteStore(cfg.db_path)
    ca = Ca.load(cfg.ca, cfg.ca_key) if cfg.ca_key.exists() else None
    api = Csms(Ctx(store, load_or_create_signer(cfg.signing_key), ca, cfg.settings))
    try:
        if args.cmd == "list-stations":
            cols = ("site_id", "device_id", "registration", "model", "vendor", "serial", "fw_version", "last_seen")
            _table(api.stations(), cols, out)
        elif args.cmd == "list-sessions":
            cols = ("site_id", "device_id", "tx_id", "evse", "state", "id_token", "tariff_id", "stop_reason")
            _table(api.sessions(), cols, out)
        elif args.cmd == "list-commands":
            rows = store.select("commands", {"site_id": args.site} if args.site else None, order="cmd_id")
            _table(rows, ("cmd_id", "site_id", "name", "targets", "state", "reason", "results"), out)
        elif args.cmd == "list-forecasts":
            if args.all:
                rows = api.forecasts(args.site, args.zone)
            else:
                last = api.forecast(args.site, args.zone)
                rows = [last] if last is not None else []
            flat = [{**r, "start_s": p["start_s"], "limit_w": p["limit_w"]} for r in rows for p in r["forecast"]]
            _table(flat, ("forecast_id", "site_id", "zone", "at", "start_s", "limit_w"), out)
        elif args.cmd == "list-boards":
            board_cols = ("device_id", "evse", "evse_gid", "evse_status", "max_power_w", "model", "vendor", "serial",
                          "fw_version", "registration", "at")  # fmt: skip
            _table(api.boards(args.site), board_cols, out)
        elif args.cmd == "send-limit":
            if args.available:
                cmd = api.available_power(args.site, args.limit_w, args.zone)
            else:
                cmd = api.send_limit(args.site, args.limit_w, args.zone, args.deadline_ms)
            out.write(f"command {cmd} queued for {args.site}\n")
        elif args.cmd == "firmware-campaign":
            when = ResetWhen.NOW if args.now else ResetWhen.IDLE
            campaign = api.firmware_campaign(args.site, args.image.read_bytes(), args.version, args.targets, when=when)
            out.write(f"campaign {campaign} (image {campaign}) queued for {', '.join(args.targets)}\n")
        elif args.cmd == "set-registration":
            sent = api.set_registration(args.site, args.device, args.registration)
            out.write(f"commands {', '.join(map(str, sent))} queued for {args.site}\n" if sent else "recorded\n")
        elif args.cmd == "register-device":
            sent = api.register_device(args.site, args.device)
            out.write(f"commands {', '.join(map(str, sent))} queued for {args.site}\n")
        elif args.cmd in ("revoke", "revoke-site", "revoke-server-certificate"):
            if args.cmd == "revoke":
                sent = api.revoke(args.cert_hash, args.reason)
            elif args.cmd == "revoke-site":
                sent = api.revoke_site(args.site, args.reason)
            else:
                sent = api.revoke_server_certificate(args.reason)
            out.write(f"revoked; commands {', '.join(map(str, sent)) or 'none'} queued\n")
        elif args.cmd == "list-certificates":
            _table(api.tls_certificates(), ("cert_hash", "serial", "subject", "role", "site_id", "revoked"), out)
        elif args.cmd == "list-security-events":
            _table(api.security_events(), ("site_id", "device_id", "event_name", "time", "reason"), out)
        elif args.cmd == "deregister":
            cmd = api.deregister(args.site, args.device, args.reason)
            out.write(f"command {cmd} queued for {args.site}\n")
        elif args.cmd == "migrate":
            cert = args.cert.read_bytes() if args.cert is not None else None
            if cert is not None and b"-----BEGIN" in cert:
                cert = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
            cmd = api.migrate(args.site, args.targets, args.address, cert)
            out.write(f"command {cmd} queued for {args.site}\n")
        elif args.cmd == "add-token":
            api.add_token(args.token, args.status, tariff_id=args.tariff)
        elif args.cmd == "set-tariff":
            cmd = api.set_tariff(
                args.site,
                args.id,
                args.price_kwh,
                args.currency,
                price_min=args.price_min,
                price_session=args.price_session,
            )
            out.write(f"command {cmd} queued for {args.site}\n")
        elif args.cmd == "set-site":
            place = {"address": args.address, "city": args.city, "postal_code": args.postal_code,
                     "country": args.country}  # fmt: skip
            kind = {"connector_standard": args.connector_standard, "connector_format": args.connector_format,
                    "power_type": args.power_type}  # fmt: skip
            rec = api.set_site(args.site, name=args.name, lat=args.lat, lon=args.lon, capabilities=args.capabilities,
                               **place, **kind)  # fmt: skip
            _table([rec], ("site_id", "name", *place, "latitude", "longitude", *kind, "capabilities"), out)
        elif args.cmd == "set-connector":
            kind = {"connector_standard": args.connector_standard, "connector_format": args.connector_format,
                    "power_type": args.power_type}  # fmt: skip
            rec = api.set_connector(args.site, args.device, args.evse, **kind, meter_key=args.meter_key)
            _table([{**rec, "meter_key": (rec.get("meter_key") or b"").hex()}],
                   ("site_id", "device_id", "evse", *kind, "meter_key"), out)  # fmt: skip
        elif args.cmd == "export-sdrs":
            export_sdrs(api, args.format, out)
    except (CsmsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
