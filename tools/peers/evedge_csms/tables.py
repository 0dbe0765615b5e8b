"""The CSMS data model: one list of tables, from which each store backend makes its DDL.

Column types are portable names (`int`, `text`, `blob`, `json`); `json` columns hold any
JSON-serialisable value (bytes inside are stored as {"hex": ...}). Keeping the model as data
lets a PostgreSQL backend reuse it unchanged (`INSERT ... ON CONFLICT` is common to both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)


def _t(name: str, key: str, cols: str) -> Table:
    columns = tuple((c.split(":")[0], c.split(":")[1] if ":" in c else "text") for c in cols.split())
    return Table(name, columns, tuple(key.split()))


TABLES: Final[tuple[Table, ...]] = (
    _t("counters", "name", "name value:int"),
    _t("sites", "site_id", "site_id first_seen:int last_seen:int connected:int schema_rev:int cert_subject"),
    _t(
        "stations",
        "site_id device_id",
        "site_id device_id model vendor serial fw_version registration boot_reason first_seen:int last_seen:int"
        " deregistered:int migrated_to",
    ),
    _t(
        "evses",
        "site_id device_id evse connector",
        "site_id device_id evse:int connector:int state:int cp_state:int time:int evse_gid",
    ),
    _t(
        "received",
        "site_id device_id msg_id grp",
        "site_id device_id msg_id:int grp:int action:int relay_id:int at:int",
    ),
    _t(
        "transactions",
        "site_id device_id tx_id",
        "site_id device_id tx_id:int evse:int evse_gid id_token token_type:int started:int stopped:int"
        " meter_start_wh:int meter_stop_wh:int tariff_id:int board_cost:int stop_reason:int remote_start_id:int"
        " reservation_id:int state tx_gid session_id:int session_gid charging_session_id:int"
        " meter_start_out_wh:int meter_stop_out_wh:int",
    ),
    _t(
        "service_sessions",
        "site_id device_id session_id",
        "site_id device_id session_id:int session_gid evse:int evse_gid charging_session_id:int remote_start_id:int"
        " started:int stopped:int stop_reason:int state",
    ),
    _t(
        "tx_events",
        "site_id device_id tx_id seq_no",
        "site_id device_id tx_id:int seq_no:int msg_id:int event:int trigger:int time:int energy_wh:int"
        " power_w:int signed_meter:blob body:json",
    ),
    _t(
        "meter_values",
        "site_id device_id msg_id",
        "site_id device_id msg_id:int evse:int tx_id:int time:int energy_wh:int power_w:int signed_meter:blob"
        " body:json",
    ),
    _t(
        "sdrs",
        "sdr_id",
        "sdr_id site_id device_id tx_id:int evse:int evse_gid id_token started:int stopped:int meter_start_wh:int"
        " meter_stop_wh:int energy_wh:int tariff_id:int currency cost:int signed_meter:json created:int"
        " session_id:int session_gid meter_start_out_wh:int meter_stop_out_wh:int energy_out_wh:int"
        " transactions:json",
    ),
    _t("security_events", "site_id device_id msg_id", "site_id device_id msg_id:int event_name time:int reason"),
    _t(
        "fault_reports",
        "site_id device_id msg_id",
        "site_id device_id msg_id:int fault_code:int active:int time:int evse:int reason",
    ),
    _t("fault_table", "fault_code", "fault_code:int severity:int text"),
    _t(
        "fw_campaigns",
        "campaign_id",
        "campaign_id:int image_id:int version size:int sha256:blob signature:blob signer path site_id targets:json"
        " created:int",
    ),
    _t(
        "fw_status",
        "site_id device_id image_id",
        "site_id device_id image_id:int fw_status:int reason version slot:int time:int history:json",
    ),
    _t(
        "logs",
        "site_id device_id request_id",
        "site_id device_id request_id:int log_type:int log_status:int size:int data:blob complete:int updated:int",
    ),
    _t(
        "log_chunks",
        "site_id device_id request_id offset",
        "site_id device_id request_id:int offset:int data:blob last:int",
    ),
    _t(
        "monitor_events",
        "site_id device_id msg_id",
        "site_id device_id msg_id:int monitor_id:int component variable val severity:int time:int evse:int",
    ),
    _t("monitors", "site_id device_id monitor_id", "site_id device_id monitor_id:int spec:json"),
    _t(
        "reservations",
        "reservation_id",
        "reservation_id:int site_id device_id evse:int id_token expiry:int status updated:int",
    ),
    _t("tokens", "id_token", "id_token auth_status:int expiry:int tariff_id:int token_type:int"),
    _t(
        "tariffs",
        "tariff_id",
        "tariff_id:int price_kwh:int price_min:int price_session:int currency valid_from:int text",
    ),
    _t(
        "certificates",
        "cert_hash",
        "cert_hash serial subject site_id device_id cert_type:int der:blob issued:int revoked:int revoke_reason",
    ),
    _t(  # M19: the TLS certificates the CSMS met (its own, each site's), revocable by the operator
        "tls_certificates",
        "cert_hash",
        "cert_hash serial subject role site_id der:blob seen:int revoked:int revoke_reason",
    ),
    _t("crls", "number", "number:int der:blob issued:int"),
    _t(
        "display_messages",
        "site_id display_id",
        "site_id display_id:int text display_priority:int language valid_from:int valid_to:int evse:int",
    ),
    _t(
        "variables",
        "site_id device_id component variable instance evse attr",
        "site_id device_id component variable instance evse:int attr:int val status:int updated:int",
    ),
    _t(
        "reports",
        "site_id device_id request_id seq_no",
        "site_id device_id request_id:int seq_no:int vars:json last:int",
    ),
    _t(
        "measurements",
        "site_id device_id msg_id",
        "site_id device_id msg_id:int kind evse:int power_w:int setpoint_w:int freq_mhz:int time:int",
    ),
    _t("ev_needs", "site_id device_id msg_id", "site_id device_id msg_id:int evse:int body:json"),
    _t("forecasts", "forecast_id", "forecast_id:int site_id zone:int at:int forecast:json"),
    _t("boards_reports", "site_id", "site_id at:int evses:json"),
    _t(
        "reservation_updates",
        "site_id device_id msg_id",
        "site_id device_id msg_id:int reservation_id:int res_status:int",
    ),
    _t(
        "ev_cert_requests",
        "site_id device_id msg_id",
        "site_id device_id msg_id:int action_15118:int exi:blob status evse_gid reason at:int answered:int",
    ),
    _t("privacy_requests", "request_id", "request_id:int token_digest at:int deleted:json"),
    # R1-2: the operator's record of a site, published as its location (coordinates: JSON numbers)
    _t(
        "site_records",
        "site_id",
        "site_id name address city postal_code country latitude:json longitude:json connector_standard"
        " connector_format power_type capabilities:json",
    ),
    # R1-2: the operator's record of one EVSE's connector, over its site's
    _t(
        "evse_records",
        "site_id device_id evse",
        "site_id device_id evse:int connector_standard connector_format power_type meter_key:blob",
    ),
    _t(
        "commands",
        "cmd_id",
        "cmd_id:int site_id action:int name kind:int wrap:int targets:json frame:blob prio:int expiry:int"
        " signature:blob signer state results:json reason created:int sent:int done:int ref",
    ),
)

BY_NAME: Final[dict[str, Table]] = {t.name: t for t in TABLES}
