"""The certificates and keys of one local control plane, as kubeadm lays them out.

One cluster CA signs the serving certificates (kube-apiserver, etcd, controller-manager,
scheduler) and every client certificate (who a component is, by CN and O, is what RBAC and
the Node authorizer decide on); a separate front-proxy CA signs the aggregator's proxy
client, as on a production cluster; the ServiceAccount key pair signs and verifies tokens.
Pure: nothing is written here (``write`` does that).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from k8s_ext_connector.certs.tls import Issued, backdate, generate_ca, write_pair

LIFETIME = datetime.timedelta(days=1)  # a control plane lives as long as a test session

# Client identities: (file stem, CN, O). The CNs and groups are the ones the API server's
# bootstrap RBAC policy binds (system:kube-controller-manager, system:kube-scheduler).
ADMIN = ("admin", "kubernetes-admin", ("system:masters",))
CONTROLLER_MANAGER = ("controller-manager", "system:kube-controller-manager", ())
SCHEDULER = ("scheduler", "system:kube-scheduler", ())
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER)


@dataclass(frozen=True)
class ClusterPki:
    ca: Issued
    front_proxy_ca: Issued
    apiserver: Issued
    etcd_server: Issued
    apiserver_etcd_client: Issued
    apiserver_kubelet_client: Issued
    front_proxy_client: Issued
    controller_manager_serving: Issued
    scheduler_serving: Issued
    clients: dict[str, Issued]  # by file stem (ADMIN[0], ...)
    service_account_key_pem: bytes  # private, signs tokens
    service_account_pub_pem: bytes

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return f"ClusterPki(ca={self.ca!r})"


def _issue(
    ca: Issued,
    common_name: str,
    organizations: tuple[str, ...] = (),
    *,
    server_names: tuple[str, ...] = (),
    client: bool = False,
) -> Issued:
    """A leaf certificate; ``server_names`` (DNS names or IPs) make it a serving one."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate(LIFETIME))
        .not_valid_after(min(now + LIFETIME, ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def apiserver_names(address: str, kubernetes_service_ip: str) -> tuple[str, ...]:
    """What clients dial: the address, loopback, the `kubernetes` Service's IP and names."""
    names = (
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    )
    return (*names, kubernetes_service_ip, *((address,) if address != "127.0.0.1" else ()))


def node_client(ca: Issued, node: str) -> Issued:
    """A kubelet's client certificate, as its TLS bootstrap would get it."""
    return _issue(ca, f"system:node:{node}", ("system:nodes",), client=True)


def cluster_pki(address: str, kubernetes_service_ip: str) -> ClusterPki:
    ca = generate_ca("kubernetes", LIFETIME)
    front_proxy_ca = generate_ca("front-proxy-ca", LIFETIME)
    local = ("localhost", "127.0.0.1", *((address,) if address != "127.0.0.1" else ()))
    sa_key = ec.generate_private_key(ec.SECP256R1())
    return ClusterPki(
        ca=ca,
        front_proxy_ca=front_proxy_ca,
        apiserver=_issue(
            ca, "kube-apiserver", server_names=apiserver_names(address, kubernetes_service_ip)
        ),
        # Server and client usages, as kubeadm's: etcd's gRPC gateway dials etcd itself
        # with this certificate, which --client-cert-auth then checks.
        etcd_server=_issue(ca, "etcd", server_names=local, client=True),
        apiserver_etcd_client=_issue(ca, "kube-apiserver-etcd-client", client=True),
        # What the API server presents to kubelets (logs, exec): an administrator.
        apiserver_kubelet_client=_issue(
            ca, "kube-apiserver-kubelet-client", ("system:masters",), client=True
        ),
        front_proxy_client=_issue(front_proxy_ca, "front-proxy-client", client=True),
        controller_manager_serving=_issue(ca, "kube-controller-manager", server_names=local),
        scheduler_serving=_issue(ca, "kube-scheduler", server_names=local),
        clients={
            stem: _issue(ca, cn, organizations, client=True) for stem, cn, organizations in CLIENTS
        },
        service_account_key_pem=sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        service_account_pub_pem=sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@dataclass(frozen=True)
class PkiFiles:
    """Where ``write`` put each file (the flags name these paths)."""

    directory: Path

    def cert(self, stem: str) -> Path:
        return self.directory / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.directory / f"{stem}.key"

    @property
    def sa_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.directory / "sa.pub"


def write(pki: ClusterPki, directory: Path) -> PkiFiles:
    """Every pair as <stem>.crt / <stem>.key (keys 0600), kubeadm's file names."""
    pairs = {
        "ca": pki.ca,
        "front-proxy-ca": pki.front_proxy_ca,
        "apiserver": pki.apiserver,
        "etcd-server": pki.etcd_server,
        "apiserver-etcd-client": pki.apiserver_etcd_client,
        "apiserver-kubelet-client": pki.apiserver_kubelet_client,
        "front-proxy-client": pki.front_proxy_client,
        "controller-manager-serving": pki.controller_manager_serving,
        "scheduler-serving": pki.scheduler_serving,
        **pki.clients,
    }
    for stem, issued in pairs.items():
        write_pair(directory, issued, f"{stem}.crt", f"{stem}.key")
    files = PkiFiles(directory)
    write_pair(
        directory,
        Issued(pki.service_account_pub_pem, pki.service_account_key_pem),
        files.sa_pub.name,
        files.sa_key.name,
    )
    return files


def client_certificate(ca: Issued, common_name: str, organizations: tuple[str, ...]) -> Issued:
    """A client certificate from the cluster CA: who a caller is (CN user, O groups), e.g. a
    kubelet's ``system:node:<name>`` in ``system:nodes`` for the Node authorizer."""
    return _issue(ca, common_name, organizations, client=True)
