"""DestinationRule `tls` (ClientTLSSettings) checked where it is written and compiled per cluster
into an `UpstreamTls`.

Every `tls` block of a DestinationRule (top level, portLevelSettings, subsets and theirs) is checked
on its own, its files loaded once into a throw-away context, so a missing file or a key that does not
match its certificate is a config error at the field naming it and the proxy keeps its last good
config. The cluster's effective block (policies.cluster_traffic_policy: subset port-level > subset >
port-level > top level, each replacing the tls as a whole) is then compiled without further checks.

Without a tls block, auto mTLS: Istio mutual TLS to the endpoints that have a sidecar, unless the
service is MESH_EXTERNAL or its namespace's PeerAuthentication disables mTLS (service_mtls_mode, as
Istio infers it). ISTIO_MUTUAL, explicit or auto, accepts a server of the service's accounts.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable

from proxy.authz import peer_authentication
from proxy.config.istio import ClientTLSSettings, DestinationRuleSpec
from proxy.config.load import Resource
from proxy.config.snapshot import UpstreamTls
from proxy.tls.certificates import CredentialError, resolve_credential
from proxy.tls.context import TlsSettingsError
from proxy.tls.mesh import client_alpn, service_account_san
from proxy.tls.upstream import client_context_for

# service port protocols whose clusters the HTTP data path speaks to (the others are TCP routes:
# spliced in plaintext, or copied through OpenSSL when the cluster originates TLS)
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB")

_DNS_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _server_name_ok(name: str) -> bool:
    """A name a ClientHello can carry and a certificate can be checked against: a DNS name or an IP."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return len(name) <= 253 and _DNS_NAME.fullmatch(name) is not None


def tls_blocks(spec: DestinationRuleSpec):
    """(field path, ClientTLSSettings) of every tls block a DestinationRule writes."""
    def of_policy(path: str, tp):
        if tp is None:
            return
        if tp.tls is not None:
            yield f"{path}.tls", tp.tls
        for i, p in enumerate(tp.port_level_settings):
            if p.tls is not None:
                yield f"{path}.portLevelSettings[{i}].tls", p.tls
    yield from of_policy("$.spec.trafficPolicy", spec.traffic_policy)
    for i, s in enumerate(spec.subsets):
        yield from of_policy(f"$.spec.subsets[{i}].trafficPolicy", s.traffic_policy)


def check_rule(r: Resource, credentials_dir: str | None) -> None:
    for path, tls in tls_blocks(r.obj.spec):
        check(r, path, tls, credentials_dir)


def check(r: Resource, path: str, tls: ClientTLSSettings, credentials_dir: str | None) -> None:
    if tls.mode == "DISABLE":
        return  # Istio ignores the other fields in this mode
    if tls.mode == "ISTIO_MUTUAL":
        for field in ("clientCertificate", "privateKey", "caCertificates", "credentialName"):
            if getattr(tls, _snake(field)):
                raise r.error(f"{path}.{field}", f"mode ISTIO_MUTUAL uses the workload certificate: {field} must be "
                                                 "empty (use MUTUAL for certificates of your own)")
        if tls.sni and not _server_name_ok(tls.sni):
            raise r.error(f"{path}.sni", f"sni {tls.sni!r} is not a DNS name or IP address")
        return
    compiled = compile_settings(r, path, tls, "probe.invalid", (), ("http/1.1",), credentials_dir)
    try:
        client_context_for(compiled, cached=False)
    except TlsSettingsError as e:
        field = "credentialName" if tls.credential_name and e.field in ("clientCertificate", "privateKey") else e.field
        raise r.error(f"{path}.{field}", str(e)) from e


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


# Istio's endpoint label saying the endpoint has a sidecar that takes mesh mTLS
TLS_MODE_LABEL = "security.istio.io/tlsMode"


def mesh_sni(host: str, port: int, subset: str) -> str:
    """The SNI a sidecar sends with Istio mutual TLS (Istio's `outbound_.<port>_.<subset>_.<host>`)."""
    return f"outbound_.{port}_.{subset}_.{host}"


def service_accounts(namespace: str, endpoint_accounts: Iterable[str],
                     subject_alt_names: Iterable[str]) -> tuple[str, ...]:
    """Istio's ServiceAccounts of a service, the server identities ISTIO_MUTUAL accepts when its tls
    block names none: the SPIFFE IDs of its endpoints' `serviceAccount` (of the service's namespace,
    in the mesh's trust domain: service_account_san) and the ServiceEntry's subjectAltNames, sorted.
    Empty: none known, the server is checked by its chain alone."""
    accounts = {service_account_san(namespace, account) for account in endpoint_accounts if account}
    return tuple(sorted(accounts.union(subject_alt_names)))


def namespace_mtls_mode(peer_authentications: Iterable, root_namespace: str, namespace: str) -> str:
    """The mode the mesh- and namespace-wide PeerAuthentications give the workloads of `namespace`
    (Istio's GetNamespaceMutualTLSMode, PERMISSIVE without any). Workload and port-level policies are
    left out, as Istio leaves them out of its inference: a client cannot tell which workloads a
    selector picks."""
    no_labels: dict[str, str] = {}  # matched by no selector: only the policies without one apply
    return peer_authentication.resolve(peer_authentications, root_namespace, namespace, no_labels).mode


def service_mtls_mode(mesh_external: bool, passthrough: bool, endpoints, namespace_mode: str) -> str | None:
    """Istio's BestEffortInferServiceMTLSMode, the hint auto mTLS follows: None (unknown) for a
    MESH_EXTERNAL service; DISABLE for a passthrough one (resolution NONE or loadBalancer PASSTHROUGH:
    a connection goes wherever the app sent it) without endpoints or with one that has no sidecar;
    otherwise the mode of the service's namespace."""
    if mesh_external:
        return None
    if passthrough and (not endpoints or any(_tls_mode(e) == "disabled" for e in endpoints)):
        return "DISABLE"
    return namespace_mode


def _tls_mode(endpoint) -> str:
    """Istio's GetTLSModeFromEndpointLabels: the label's value, `disabled` without it."""
    return endpoint.labels.get(TLS_MODE_LABEL, "disabled")


def istio_mutual(r: Resource, tls: ClientTLSSettings, host: str, port: int, subset: str,
                 accounts: tuple[str, ...], http2: bool | None) -> UpstreamTls:
    """DestinationRule ISTIO_MUTUAL: the workload certificate to every endpoint (`http2` None: TCP);
    the server is one of the rule's subjectAltNames, else of the service's `accounts`."""
    return UpstreamTls(mode="ISTIO_MUTUAL", sni=tls.sni or mesh_sni(host, port, subset),
                       subject_alt_names=tuple(tls.subject_alt_names) or accounts,
                       alpn=client_alpn(http2), origin=f"DestinationRule {r.namespace}/{r.name}")


def auto_mtls(host: str, port: int, subset: str, endpoints, accounts: tuple[str, ...],
              http2: bool | None, service_mode: str | None) -> UpstreamTls | None:
    """Auto mTLS (no DestinationRule tls): ISTIO_MUTUAL to the endpoints labelled with a sidecar, for
    HTTP clusters and TCP ones (`http2` None: ALPN `istio`), unless the service's inferred mode
    (service_mtls_mode) is unknown or DISABLE: a DISABLE server would hand the TLS bytes to its app."""
    if service_mode is None or service_mode == "DISABLE":
        return None
    mesh = frozenset(e.key for e in endpoints if e.labels.get(TLS_MODE_LABEL) == "istio")
    if not mesh:
        return None
    return UpstreamTls(mode="ISTIO_MUTUAL", sni=mesh_sni(host, port, subset), subject_alt_names=accounts,
                       alpn=client_alpn(http2), origin="auto mTLS", mesh_endpoints=mesh)


def compile_settings(r: Resource, path: str, tls: ClientTLSSettings, host: str, service_sans: tuple[str, ...],
                     alpn: tuple[str, ...], credentials_dir: str | None) -> UpstreamTls | None:
    """The UpstreamTls of one cluster (None for DISABLE). `host`: the destination host, the default
    SNI; `service_sans`: the ServiceEntry's subjectAltNames, used when the tls block names none."""
    if tls.mode == "DISABLE":
        return None
    cert_file, key_file, ca_file = tls.client_certificate, tls.private_key, tls.ca_certificates
    if tls.credential_name:
        if cert_file or key_file or ca_file:
            raise r.error(f"{path}.credentialName", "credentialName and clientCertificate/privateKey/caCertificates "
                                                    "exclude each other (the secret holds them)")
        try:
            files = resolve_credential(credentials_dir, tls.credential_name, need_ca=False)
        except CredentialError as e:
            raise r.error(f"{path}.credentialName", str(e)) from e
        ca_file = files.ca_file
        if tls.mode == "MUTUAL":
            cert_file, key_file = files.cert_file, files.key_file
    elif tls.mode == "MUTUAL":
        if not cert_file:
            raise r.error(f"{path}.clientCertificate", "mode MUTUAL needs clientCertificate and privateKey, or credentialName")
        if not key_file:
            raise r.error(f"{path}.privateKey", "mode MUTUAL needs privateKey with clientCertificate")
    elif cert_file or key_file:
        field = "clientCertificate" if cert_file else "privateKey"
        raise r.error(f"{path}.{field}", "mode SIMPLE sends no client certificate: use mode MUTUAL")
    if tls.sni and not _server_name_ok(tls.sni):
        raise r.error(f"{path}.sni", f"sni {tls.sni!r} is not a DNS name or IP address")
    if not tls.sni and not _server_name_ok(host):
        raise r.error(f"{path}.sni", f"sni defaults to the destination host, and {host!r} is not a name a server "
                                     "certificate can be checked against: set sni")
    return UpstreamTls(
        mode=tls.mode, sni=tls.sni or host, subject_alt_names=tuple(tls.subject_alt_names) or service_sans,
        ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        insecure_skip_verify=bool(tls.insecure_skip_verify), alpn=alpn,
        origin=f"DestinationRule {r.namespace}/{r.name}")
