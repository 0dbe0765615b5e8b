"""Certificates: M14 CA certificates, M15 OCSP responses, M16/M18 the station's own
certificate, M17 the local CSMS's certificate, M19 revocation, S7 the EV's contract
certificate relayed over ISO 15118.

- Trust store: each certificate in its own file `crt/<hash hex>` (≤ 2 KiB), the index
  `[[cert_type, sha256], …]` (≤ MAX_CERTS) in `certs`; only the index stays in RAM.
  InstallCertificate takes the CA types (csms_root, manufacturer_root, local_csms — M17,
  the site's local CSMS in a multi-level architecture —, v2g_root, mo_root); the
  station's own certificate comes only by CertificateSigned.
- OCSP responses (M15) are stored beside the certificate they answer for (`crt/<hash>.o`),
  ready to be stapled for an EV; one for a certificate not installed is rejected, and one past
  its nextUpdate too. The EV is given it when it asks (`ocsp_to_ev`, `hal.ev_ocsp()`) while it
  is fresh; past its nextUpdate it is dropped instead (no nextUpdate: no expiry, RFC 6960).
- Revocation (M19): the certificate leaves the trust store and its hash goes on the
  revoked list (`revoked`, on flash), so installing it again is rejected.
- Key pair (M16): MicroPython has no RSA/ECDSA key generation, so the board's HAL (its
  secure element; simulated in boards/sim.py) makes the key pair and the CSR (`hal.csr()`), and
  the private key never leaves it. SignCertificate is sent when the CSMS triggers it
  (TriggerMessage) or at boot when no station certificate is installed and the CSMS asks.
  CertificateSigned is accepted only while a CSR is pending (M16) or when it carries the
  key pair made outside (M18: `private_key`, a secret field, AES-CTR under the link key),
  which goes into the secure element (`hal.install_key()`).
- S7: the EV's Get15118EVCertificate EXI (from the HAL) goes to the gateway as a request;
  the answer's EXI goes back to the EV (`hal.ev_exi()`).
"""

# ruff: noqa: PLC0415
# `import hashlib` inside the two functions that hash is deliberate: a name imported at the top is
# a global of the module (heap on a board: its globals table holds 12 names in 96 bytes, 13 take 144).

from micropython import const

from .. import store
from ..msgpack import Map
from ..schema import (
    A_CERTIFICATE_SIGNED,
    A_DELETE_CERTIFICATE,
    A_GET15118_EV_CERTIFICATE,
    A_GET_INSTALLED_CERTIFICATES,
    A_INSTALL_CERTIFICATE,
    A_OCSP_RESPONSE,
    A_REVOKE_CERTIFICATE,
    A_SIGN_CERTIFICATE,
    CERT_TYPE_CHARGING_STATION,
    CERT_TYPE_LOCAL_CSMS,
    CERT_TYPE_MO_ROOT,
    F_ACTION_15118,
    F_CERT,
    F_CERT_HASH,
    F_CERT_HASHES,
    F_CERT_TYPE,
    F_CSR,
    F_EXI,
    F_OCSP,
    F_PRIVATE_KEY,
    F_REASON,
    F_STATUS,
    STATUS_ACCEPTED,
    STATUS_REJECTED,
    STATUS_UNKNOWN,
)
from . import Service, refused, status

MAX_CERTS = const(16)
_DER_SEQ = const(0x30)  # a DER certificate starts with a SEQUENCE
# SubjectPublicKeyInfo of an Ed25519 key (RFC 8410), the 32 key bytes follow: the board reads
# the local CSMS's key out of its certificate without an X.509 parser
# nextUpdate [0] EXPLICIT GeneralizedTime "YYYYMMDDHHMMSSZ" of a SingleResponse (RFC 6960):
# the only [0] of that length holding a GeneralizedTime in a response, found without a parser
_NEXT_UPDATE = b"\xa0\x11\x18\x0f"
_ED25519_SPKI = b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00"


def next_update(resp):
    """The OCSP response's nextUpdate in board time (seconds since 2024-01-01), or None."""
    i = resp.find(_NEXT_UPDATE)
    if i < 0 or len(resp) < i + 19:
        return None
    s = bytes(resp[i + 4 : i + 18]).decode()
    y, mo, d = int(s[0:4]), int(s[4:6]), int(s[6:8])
    y -= mo <= 2  # days from the civil date (H. Hinnant's algorithm), March-based years
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468 - 19723  # 1970, then 2024
    return days * 86400 + int(s[8:10]) * 3600 + int(s[10:12]) * 60 + int(s[12:14])


class Security(Service):
    COMMANDS = (
        A_INSTALL_CERTIFICATE, "install",
        A_DELETE_CERTIFICATE, "delete",
        A_GET_INSTALLED_CERTIFICATES, "installed",
        A_OCSP_RESPONSE, "ocsp",
        A_CERTIFICATE_SIGNED, "signed",
        A_REVOKE_CERTIFICATE, "revoke",
    )  # fmt: skip

    def __init__(self, app):
        Service.__init__(self, app)  # not super(): a closure and a cell of heap per class on a board
        self.dir = store.path("crt")
        store.mkdir(self.dir)
        self.certs = store.load(store.path("certs"), []) or []  # [[cert_type, sha256]]
        self.revoked = store.load(store.path("revoked"), []) or []  # sha256 of revoked certificates
        self.csr_pending = False
        self._anchor()

    @staticmethod
    def key_of(der):
        """The Ed25519 public key a certificate carries, or None."""
        i = der.find(_ED25519_SPKI) if der else -1
        return bytes(der[i + 12 : i + 44]) if i >= 0 and len(der) >= i + 44 else None

    def _anchor(self):
        """M14/M17: the link trusts as its gateway only the holder of the Ed25519 key of the
        local-CSMS certificate installed last (no such certificate: trust on first use)."""
        key = None
        for c in self.certs:
            if c[0] == CERT_TYPE_LOCAL_CSMS:
                key = self.key_of(store.read(self._file(c[1]))) or key
        if key != self.app.link.anchor:  # on flash: the app gives it to the link at boot
            if key is None:
                store.remove(store.path("anchor"))
            else:
                store.write_atomic(store.path("anchor"), key)
            self.app.link.anchor = key

    def _file(self, h):
        return "%s/%s" % (self.dir, "".join("%02x" % x for x in h[:8]))  # its first 8 bytes in hex

    def _find(self, h):
        for c in self.certs:
            if c[1] == h:
                return c
        return None

    def _save(self):
        store.save(store.path("certs"), self.certs)

    def _check_der(self, cert):
        if len(cert) < 16 or cert[0] != _DER_SEQ:
            raise refused("certificate is not DER")

    def _add(self, ctype, cert):
        import hashlib

        h = hashlib.sha256(cert).digest()
        if h in self.revoked:
            return status(STATUS_REJECTED, "certificate revoked")
        if self._find(h) is None:
            if len(self.certs) >= MAX_CERTS:
                return status(STATUS_REJECTED, "trust store full (%d)" % MAX_CERTS)
            store.write_atomic(self._file(h), cert)
            self.certs.append([ctype, h])
            self._save()
            if ctype == CERT_TYPE_LOCAL_CSMS:
                self._anchor()
        self.app.note("cert_installed", {"type": ctype, "hash": h})
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- M14, M17
    def install(self, body, seq):
        ctype = body[F_CERT_TYPE]
        if ctype == CERT_TYPE_CHARGING_STATION or ctype > CERT_TYPE_MO_ROOT:
            raise refused("not a CA certificate type (the station's own comes by CertificateSigned)")
        cert = body[F_CERT]
        self._check_der(cert)
        return self._add(ctype, cert)

    def delete(self, body, seq):
        h = body[F_CERT_HASH]
        c = self._find(h)
        if c is None:
            return status(STATUS_UNKNOWN)
        self._drop(c)
        return status(STATUS_ACCEPTED)

    def _drop(self, c):
        self.certs.remove(c)
        self._save()
        store.remove(self._file(c[1]))
        store.remove(self._file(c[1]) + ".o")
        if c[0] == CERT_TYPE_LOCAL_CSMS:
            self._anchor()

    def trust_local(self, cert):
        """M12: the new site's gateway becomes the only local CSMS this board trusts."""
        for c in [c for c in self.certs if c[0] == CERT_TYPE_LOCAL_CSMS]:
            self._drop(c)
        return self._add(CERT_TYPE_LOCAL_CSMS, cert)

    def installed(self, body, seq):
        t = body.get(F_CERT_TYPE)
        b = status(STATUS_ACCEPTED)
        b[F_CERT_HASHES] = [c[1] for c in self.certs if t is None or c[0] == t]
        return b

    # ---------------------------------------------------------------- M15
    def ocsp(self, body, seq):
        h = body[F_CERT_HASH]
        if self._find(h) is None:
            return status(STATUS_REJECTED, "no such certificate")
        t = next_update(body[F_OCSP])
        if t is not None and t <= self.app.time():
            return status(STATUS_REJECTED, "OCSP response expired (past its nextUpdate)")
        store.write_atomic(self._file(h) + ".o", body[F_OCSP])
        self.app.note("ocsp_stored", {"hash": h})
        return status(STATUS_ACCEPTED)

    def ocsp_to_ev(self, h):
        """The EV asked for the OCSP response of certificate `h` (stapled over ISO 15118): it
        gets it while fresh; past its nextUpdate it is dropped and the EV gets none."""
        o = store.read(self._file(h) + ".o")
        if o is not None:
            t = next_update(o)
            if t is not None and t <= self.app.time():
                store.remove(self._file(h) + ".o")
                self.app.note("ocsp_expired", {"hash": h})
                o = None
        self.app.hal.ev_ocsp(o)
        return o is not None

    # ---------------------------------------------------------------- M19
    def revoke(self, body, seq):
        h = body[F_CERT_HASH]
        if h not in self.revoked:
            self.revoked.append(h)
            if len(self.revoked) > 32:
                self.revoked.pop(0)
            store.save(store.path("revoked"), self.revoked)
        c = self._find(h)
        if c is not None:
            self._drop(c)
        self.app.security_event("CertificateRevoked", body.get(F_REASON))
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- M16, M18
    def sign_request(self):
        """Ask the secure element for a key pair and CSR; send SignCertificate."""
        csr = self.app.hal.csr()
        if not csr:
            return False
        b = Map()
        b[F_CSR] = csr
        b[F_CERT_TYPE] = CERT_TYPE_CHARGING_STATION
        self.csr_pending = True

        def done(body, err):
            if body is None or body[F_STATUS] != STATUS_ACCEPTED:
                self.csr_pending = False
            self.app.note("csr_sent", {"ok": body is not None and body[F_STATUS] == STATUS_ACCEPTED})

        self.app.request(A_SIGN_CERTIFICATE, b, done)
        return True

    def signed(self, body, seq):
        cert = body[F_CERT]
        self._check_der(cert)
        if body[F_CERT_TYPE] != CERT_TYPE_CHARGING_STATION:
            raise refused("CertificateSigned carries the station's certificate only")
        key = body.get(F_PRIVATE_KEY)
        if key is not None:  # M18: key pair made outside, encrypted on the link
            key = self.app.link.decrypt(seq, F_PRIVATE_KEY, key)
            if len(key) < 16:
                raise refused("private key too short")
        elif not self.csr_pending:
            return status(STATUS_REJECTED, "no CSR pending for this certificate")
        import hashlib

        h = hashlib.sha256(cert).digest()
        if h in self.revoked:
            return status(STATUS_REJECTED, "certificate revoked")
        if key is not None:
            self.app.hal.install_key(key)
        store.write_atomic(store.path("cs.crt"), cert)
        self.csr_pending = False
        self.app.note("cs_cert_installed", {"hash": h, "key_outside": key is not None})
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- S7
    def ev_certificate(self, exi, action):
        """The EV asked for a contract certificate (install/update): relay it."""
        b = Map()
        b[F_EXI] = exi
        b[F_ACTION_15118] = action

        def done(body, err):
            ok = body is not None and body[F_STATUS] == STATUS_ACCEPTED and F_EXI in body
            if ok:
                self.app.hal.ev_exi(body[F_EXI])
            self.app.note("ev_certificate", {"ok": ok, "err": err})

        self.app.request(A_GET15118_EV_CERTIFICATE, b, done)
