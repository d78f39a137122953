"""The findings `triomesh validate` reports: their codes and levels, and how one prints.

Codes shared with `istioctl analyze` (IST....) keep Istio's number, name and level, so a user can look
them up in Istio's documentation; TM.... codes are triomesh's own, for what Istio does not check.
docs/validate.md holds the table with an example of each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Level(enum.Enum):
    """Severity as istioctl analyze names it; `rank` orders them for --failure-threshold."""

    ERROR = ("Error", 3)
    WARNING = ("Warning", 2)
    INFO = ("Info", 1)

    def __init__(self, label: str, rank: int) -> None:
        self.label = label
        self.rank = rank

    @classmethod
    def parse(cls, text: str) -> "Level":
        for level in cls:
            if level.label.lower() == text.lower():
                return level
        raise ValueError(f"expected one of {', '.join(level.label for level in cls)}, got {text!r}")


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    name: str
    level: Level
    meaning: str


REFERENCED_RESOURCE_NOT_FOUND = Code(
    "IST0101", "ReferencedResourceNotFound", Level.ERROR,
    "a gateway, host, host:port or host+subset named by a resource does not exist")
SCHEMA_VALIDATION_ERROR = Code(
    "IST0106", "SchemaValidationError", Level.ERROR,
    "a document is not a valid resource: unknown kind or field, wrong type or value, unsupported setting")
CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS = Code(
    "IST0109", "ConflictingMeshGatewayVirtualServiceHosts", Level.ERROR,
    "several VirtualServices bound to the mesh declare the same host")
MULTIPLE_SIDECARS_WITHOUT_WORKLOAD_SELECTORS = Code(
    "IST0111", "MultipleSidecarsWithoutWorkloadSelectors", Level.ERROR,
    "several Sidecars of one namespace have no workloadSelector")
VIRTUAL_SERVICE_DESTINATION_PORT_SELECTOR_REQUIRED = Code(
    "IST0112", "VirtualServiceDestinationPortSelectorRequired", Level.ERROR,
    "a destination names a service with several ports but no port")
VIRTUAL_SERVICE_HOST_NOT_FOUND_IN_GATEWAY = Code(
    "IST0132", "VirtualServiceHostNotFoundInGateway", Level.WARNING,
    "a VirtualService bound to a Gateway declares hosts none of that Gateway's servers accept")
CONFLICTING_GATEWAYS = Code(
    "IST0145", "ConflictingGateways", Level.ERROR,
    "Gateways with the same selector serve the same host on the same port")
INVALID_YAML = Code(
    "TM0001", "InvalidYaml", Level.ERROR,
    "a file (from that document on) or a document is not valid YAML, or repeats a mapping key")
DUPLICATE_RESOURCE = Code(
    "TM0002", "DuplicateResource", Level.ERROR,
    "two documents define the same kind, namespace and name")
NOT_ACCEPTED_BY_COMPILER = Code(
    "TM0003", "NotAcceptedByCompiler", Level.ERROR,
    "the config passes the checks above but triomesh would still refuse to load it (the reason follows)")
DUPLICATE_SUBSET = Code(
    "TM0004", "DuplicateSubset", Level.WARNING,
    "several DestinationRules for one host define the same subset name; the first one's is used")

CODES: tuple[Code, ...] = (
    REFERENCED_RESOURCE_NOT_FOUND,
    SCHEMA_VALIDATION_ERROR,
    CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS,
    MULTIPLE_SIDECARS_WITHOUT_WORKLOAD_SELECTORS,
    VIRTUAL_SERVICE_DESTINATION_PORT_SELECTOR_REQUIRED,
    VIRTUAL_SERVICE_HOST_NOT_FOUND_IN_GATEWAY,
    CONFLICTING_GATEWAYS,
    INVALID_YAML,
    DUPLICATE_RESOURCE,
    NOT_ACCEPTED_BY_COMPILER,
    DUPLICATE_SUBSET,
)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a finding points: the resource (kind "" for a file-level problem) and its place."""

    kind: str
    namespace: str
    name: str
    file: str
    document: int  # 0-based YAML document index in file, -1 for the file itself
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if not self.kind:
            return where
        resource = f"{self.namespace}/{self.name}" if self.name else ""
        return " ".join(p for p in (self.kind, resource, where) if p)


@dataclass(frozen=True, slots=True)
class Finding:
    code: Code
    message: str
    origin: Origin
    field_path: str = "$"

    @property
    def level(self) -> Level:
        return self.code.level

    def __str__(self) -> str:
        """istioctl analyze's line: `Error [IST0101] (VirtualService default/reviews f.yaml:12) ...`."""
        return f"{self.level.label} [{self.code.code}] ({self.origin}) {self.message}"

    def as_dict(self) -> dict:
        o = self.origin
        return {
            "code": self.code.code,
            "name": self.code.name,
            "level": self.level.label,
            "message": self.message,
            "origin": {
                "kind": o.kind,
                "namespace": o.namespace,
                "name": o.name,
                "file": o.file,
                "document": o.document,
                "line": o.line,
                "path": self.field_path,
            },
        }
