"""Certificates: M14 CA certificates, M15 OCSP responses, M16/M18 the station's own
certificate, M17 the local CSMS's certificate, M19 revocation, S7 the EV's contract
certificate relayed over ISO 15118.

- Trust store: each certificate in its own file `crt/<hash hex>` (≤ 2 KiB), the index
  `[[cert_type, sha256], …]` (≤ MAX_CERTS) in `certs`; only the index stays in RAM.
  InstallCertificate takes the CA types (csms_root, manufacturer_root, local_csms — M17,
  the site's local CSMS in a multi-level architecture —, v2g_root, mo_root); the
  station's own certificate comes only by CertificateSigned.
- OCSP responses (M15) are stored beside the certificate they answer for (`crt/<hash>.o`),
  ready to be stapled for an EV; one for a certificate not installed is rejected.
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

import hashlib

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
from . import Refused, Service, status

MAX_CERTS = const(16)
_DER_SEQ = const(0x30)  # a DER certificate starts with a SEQUENCE


def _hex(h):
    return "".join("%02x" % x for x in h)


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
        super().__init__(app)
        self.dir = store.path("crt")
        store.mkdir(self.dir)
        self.certs = store.load(store.path("certs"), []) or []  # [[cert_type, sha256]]
        self.revoked = store.load(store.path("revoked"), []) or []  # sha256 of revoked certificates
        self.csr_pending = False

    def _file(self, h):
        return "%s/%s" % (self.dir, _hex(h)[:16])

    def _find(self, h):
        for c in self.certs:
            if c[1] == h:
                return c
        return None

    def _save(self):
        store.save(store.path("certs"), self.certs)

    def _check_der(self, cert):
        if len(cert) < 16 or cert[0] != _DER_SEQ:
            raise Refused("certificate is not DER")

    def _add(self, ctype, cert):
        h = hashlib.sha256(cert).digest()
        if h in self.revoked:
            return status(STATUS_REJECTED, "certificate revoked")
        if self._find(h) is None:
            if len(self.certs) >= MAX_CERTS:
                return status(STATUS_REJECTED, "trust store full (%d)" % MAX_CERTS)
            store.write_atomic(self._file(h), cert)
            self.certs.append([ctype, h])
            self._save()
        self.app.note("cert_installed", {"type": ctype, "hash": h})
        return status(STATUS_ACCEPTED)

    # ---------------------------------------------------------------- M14, M17
    def install(self, body, seq):
        ctype = body[F_CERT_TYPE]
        if ctype == CERT_TYPE_CHARGING_STATION or ctype > CERT_TYPE_MO_ROOT:
            raise Refused("not a CA certificate type (the station's own comes by CertificateSigned)")
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

    def installed(self, body, seq):
        t = body.get(F_CERT_TYPE)
        b = status(STATUS_ACCEPTED)
        b[F_CERT_HASHES] = [c[1] for c in self.certs if t is None or c[0] == t]
        return b

    def trusted(self, ctype):
        """Hashes of the installed certificates of a type (e.g. the local CSMS's, M17)."""
        return [c[1] for c in self.certs if c[0] == ctype]

    # ---------------------------------------------------------------- M15
    def ocsp(self, body, seq):
        h = body[F_CERT_HASH]
        if self._find(h) is None:
            return status(STATUS_REJECTED, "no such certificate")
        store.write_atomic(self._file(h) + ".o", body[F_OCSP])
        self.app.note("ocsp_stored", {"hash": h})
        return status(STATUS_ACCEPTED)

    def ocsp_for(self, h):
        return store.read(self._file(h) + ".o")

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
            raise Refused("CertificateSigned carries the station's certificate only")
        key = body.get(F_PRIVATE_KEY)
        if key is not None:  # M18: key pair made outside, encrypted on the link
            key = self.app.link.decrypt(seq, F_PRIVATE_KEY, key)
            if len(key) < 16:
                raise Refused("private key too short")
        elif not self.csr_pending:
            return status(STATUS_REJECTED, "no CSR pending for this certificate")
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
