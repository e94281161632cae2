"""Certificates and keys for one local control plane.

Each cluster of the local federation is independent, so each gets its own certificate
authority: a client certificate of one city is worth nothing on another.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)

# The first address of the service range: in-cluster clients reach the API server there.
KUBERNETES_SERVICE_IP = "10.96.0.1"


@dataclass(frozen=True)
class ClusterPki:
    """Paths of every certificate and key one cluster's components use."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.root / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.root / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def client_cert(self, user: str) -> Path:
        return self.root / f"{user}.crt"

    def client_key(self, user: str) -> Path:
        return self.root / f"{user}.key"


# user file name → (common name, organisation); the names are the ones RBAC's bootstrap
# roles are bound to.
CLIENTS: dict[str, tuple[str, str | None]] = {
    "admin": ("citynerve-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
}


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organisation: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attrs)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_IP)),
            ]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_cluster_pki(root: Path, cluster: str) -> ClusterPki:
    """Create (once) the CA, serving, client and service-account keys of a cluster."""
    pki = ClusterPki(root)
    if pki.ca_cert.exists() and pki.sa_pub.exists():
        return pki
    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"citynerve-{cluster}-ca")
    _write_key(pki.ca_key, ca_key)
    pki.ca_cert.write_bytes(_pem(_issue(ca_name, ca_key, ca_name, ca_key, is_ca=True)))

    serving_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki.serving_key, serving_key)
    serving = _issue(_name("kube-apiserver"), serving_key, ca_name, ca_key, server=True)
    pki.serving_cert.write_bytes(_pem(serving))

    for user, (common_name, organisation) in CLIENTS.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki.client_key(user), key)
        cert = _issue(_name(common_name, organisation), key, ca_name, ca_key)
        pki.client_cert(user).write_bytes(_pem(cert))

    # Service-account tokens are signed with RSA, which every client library verifies.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki
