"""A small etcd v3 client over etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`): read one key with its
revision, and write it only if nobody else did since (compare-and-swap on mod_revision).

The control plane needs two calls, so it speaks them directly (HTTP/1.1 + JSON, keys and values in
base64 as the gateway wants) rather than through a PyPI client: the gRPC clients bring grpcio and
generated protobuf code for two requests, and the JSON-gateway ones wrap the same three requests.
Blocking (http.client, a short timeout): the store calls it where it would call fsync; the server's
watcher runs it in a thread.
"""

from __future__ import annotations

import base64
import http.client
import json
from dataclasses import dataclass

from controlplane.durable import PersistedState, StoreError, decode_state, encode_state
from proxy.xds.failover import ControlPlaneAddress, parse_addresses


class EtcdUnavailable(OSError):
    """No etcd endpoint answered."""


@dataclass(frozen=True)
class Stored:
    value: bytes | None  # None: the key does not exist
    mod_revision: int  # 0 when it does not exist (what a create compares against)


def parse_store_url(url: str) -> tuple[ControlPlaneAddress, ...]:
    """`etcd://host:port[,host:port...]` -> endpoints. Raises ValueError."""
    prefix = "etcd://"
    if not url.startswith(prefix):
        raise ValueError(f"expected etcd://HOST:PORT[,HOST:PORT...], got {url!r}")
    return parse_addresses(url[len(prefix):].rstrip("/"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdClient:
    def __init__(self, endpoints: tuple[ControlPlaneAddress, ...], timeout_s: float = 2.0) -> None:
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._preferred = 0  # the endpoint that answered last

    def __str__(self) -> str:
        return "etcd://" + ",".join(map(str, self.endpoints))

    def _call(self, path: str, body: dict) -> dict:
        errors = []
        count = len(self.endpoints)
        for i in range(count):
            index = (self._preferred + i) % count
            endpoint = self.endpoints[index]
            conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout_s)
            try:
                conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                text = response.read()
                if response.status != 200:  # e.g. no leader during an election: try another member
                    errors.append(f"{endpoint}: {response.status} {text[:200]!r}")
                    continue
                self._preferred = index
                return json.loads(text)
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{endpoint}: {type(e).__name__}: {e}")
            finally:
                conn.close()
        raise EtcdUnavailable(f"etcd unavailable ({'; '.join(errors)})")

    def get(self, key: bytes) -> Stored:
        reply = self._call("/v3/kv/range", {"key": _b64(key)})
        for kv in reply.get("kvs", []):
            return Stored(base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
        return Stored(None, 0)

    def put_if_unchanged(self, key: bytes, value: bytes, mod_revision: int) -> int | None:
        """Write `value` if the key's mod_revision is still `mod_revision` (0: the key does not exist).
        The new revision, or None when another writer came first."""
        reply = self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })
        if not reply.get("succeeded"):
            return None
        return int(reply["header"]["revision"])


APPLIED_KEY = b"/triomesh/controlplane/applied"


@dataclass(frozen=True)
class SharedApplied:
    """The applied layer as one etcd value (a PersistedState with no workloads) and its revision."""

    state: PersistedState | None
    revision: int


class EtcdAppliedStore:
    """The applied layer shared by every replica through one etcd key; writes are compare-and-swap on
    its revision, so two replicas' concurrent applies are serialised, never interleaved or lost."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client

    def __str__(self) -> str:
        return f"{self.client}{APPLIED_KEY.decode()}"

    def read(self) -> SharedApplied:
        """Raises EtcdUnavailable, or StoreError for a value that is not ours."""
        stored = self.client.get(APPLIED_KEY)
        if stored.value is None:
            return SharedApplied(None, 0)
        try:
            return SharedApplied(decode_state(stored.value), stored.mod_revision)
        except StoreError as e:
            raise StoreError(f"{self}: {e}") from e

    def write(self, state: PersistedState, revision: int) -> int | None:
        """The new revision, or None when another replica wrote since `revision`. Raises EtcdUnavailable."""
        return self.client.put_if_unchanged(APPLIED_KEY, encode_state(state), revision)
