"""A throwaway CA and a server certificate signed by it, made with `openssl req`, for
tests of TLS relays (turns:). Everything lives in the folder the caller gives (a
pytest tmp_path or a world's directory), so it goes away with it."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RelayCertificates:
    ca: Path  # the CA certificate: what a client trusts (kbwg.json `ca_file`)
    cert: Path  # the server's certificate chain (relay --cert)
    key: Path  # its private key (relay --key)


def make_certificates(folder: Path, ip: str) -> RelayCertificates:
    """A CA, and a certificate for `ip` (subjectAltName IP) signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    csr, cert, key = folder / "relay.csr", folder / "relay.pem", folder / "relay.key"
    ext = folder / "relay.ext"
    ext.write_text(f"subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=kbwg test CA", "-keyout", str(ca_key),
             "-out", str(ca))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={ip}", "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return RelayCertificates(ca, cert, key)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)
