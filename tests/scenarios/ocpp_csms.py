"""The `ocpp` library's CSMS for the scenarios: tools/site/ocpp_csms.py (the fault campaign's
OCPP mode and the OCPP benchmark use it too)."""

from tools.site.ocpp_csms import PASSWORD, CsmsSide, OcppCsms, Seen, now_iso

__all__ = ["PASSWORD", "CsmsSide", "OcppCsms", "Seen", "now_iso"]
