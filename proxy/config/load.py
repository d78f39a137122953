"""Load Istio YAML (one file or a directory of them) into typed resources, or a precise ConfigError."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Literal, Sequence

import msgspec
import yaml

from proxy.config.errors import ConfigError
from proxy.config.istio import (
    KINDS,
    SERVER_MANAGED_METADATA,
    IstioObject,
    dec_hook,
    unsupported_settings,
)
from proxy.config.other_kinds import explain as explain_other_kind

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: SafeConstructor reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass(frozen=True, slots=True)
class Resource:
    """One Istio object plus where it came from, so later errors can point back at it."""

    obj: IstioObject
    file: str = "<memory>"
    document: int = -1

    @property
    def kind(self) -> str:
        return self.obj.kind

    @property
    def namespace(self) -> str:
        return self.obj.metadata.namespace

    @property
    def name(self) -> str:
        return self.obj.metadata.name

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.obj.kind, self.obj.metadata.namespace, self.obj.metadata.name)

    def error(self, field_path: str, message: str) -> ConfigError:
        return ConfigError(
            message,
            file=self.file,
            document=self.document,
            kind=self.kind,
            name=f"{self.namespace}/{self.name}",
            field_path=field_path,
        )


_AT = re.compile(r"^(.*) - at `(\$[^`]*)`$", re.S)
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")


def _split_validation_error(err: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's "MESSAGE - at `$.path`" -> (path, message), naming the field itself where msgspec
    names its parent object."""
    text = str(err)
    m = _AT.match(text)
    path, message = (m.group(2), m.group(1)) if m else ("$", text)
    if (u := _UNKNOWN.match(message)) is not None:
        return f"{path}.{u.group(1)}", f"unknown field `{u.group(1)}`"
    if (u := _MISSING.match(message)) is not None:
        return f"{path}.{u.group(1)}", f"required field `{u.group(1)}` is missing"
    return path, message


_PATH_TOKEN = re.compile(r"\.([^.\[]+)|\[([^\]]*)\]")


def _literal_values(cls: type, path: str) -> tuple | None:
    """The allowed values of the Literal-typed field at `path` of `cls`, if that is what it is."""
    t: Any = msgspec.inspect.type_info(cls)
    for m in _PATH_TOKEN.finditer(path[1:]):
        while isinstance(t, msgspec.inspect.UnionType):
            rest = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
            if len(rest) != 1:
                return None
            t = rest[0]
        if m.group(1) is not None and isinstance(t, msgspec.inspect.StructType):
            t = next((f.type for f in t.fields if f.encode_name == m.group(1)), None)
        elif m.group(2) is not None and isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.VarTupleType)):
            t = t.item_type
        elif isinstance(t, msgspec.inspect.DictType):
            t = t.value_type
        else:
            return None
    while isinstance(t, msgspec.inspect.UnionType):
        t = next((x for x in t.types if isinstance(x, msgspec.inspect.LiteralType)), None)
    return t.values if isinstance(t, msgspec.inspect.LiteralType) else None


def _describe(doc: dict) -> tuple[str, str]:
    """Best-effort kind and "ns/name" of a raw document, for error messages."""
    kind = doc.get("kind")
    kind = kind if isinstance(kind, str) else ""
    meta = doc.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
        ns = meta.get("namespace")
        return kind, f"{ns if isinstance(ns, str) else 'default'}/{meta['name']}"
    return kind, ""


def _without_server_fields(doc: dict) -> dict:
    """The document as its author wrote it: what the Kubernetes API server adds to an object it
    stores (metadata it manages, the `status` block) is dropped, as `kubectl apply` would ignore it."""
    meta = doc.get("metadata")
    if "status" not in doc and not (isinstance(meta, dict) and SERVER_MANAGED_METADATA.intersection(meta)):
        return doc
    out = {k: v for k, v in doc.items() if k != "status"}
    if isinstance(meta, dict):
        out["metadata"] = {k: v for k, v in meta.items() if k not in SERVER_MANAGED_METADATA}
    return out


def _convert(doc: Any, source: str, index: int, at: str = "$") -> Resource:
    """One resource; `at` is where it sits in its document ("$", or "$.items[3]" in a List)."""
    if not isinstance(doc, dict):
        raise ConfigError(
            f"expected a mapping (an Istio resource), got {type(doc).__name__}",
            file=source, document=index, field_path=at,
        )
    kind, name = _describe(doc)

    def fail(path: str, message: str) -> ConfigError:
        return ConfigError(message, file=source, document=index, kind=kind, name=name, field_path=at + path[1:])

    if "kind" not in doc:
        raise fail("$.kind", "required field `kind` is missing")
    api_version = doc.get("apiVersion")
    if (why := explain_other_kind(kind, api_version)) is not None:
        raise fail("$.kind", why)
    cls = KINDS.get(kind)
    if cls is None:
        raise fail("$.kind", f"unknown kind {doc['kind']!r} (apiVersion {api_version!r}); "
                             f"triomesh understands {', '.join(KINDS)}")
    if api_version not in cls.api_versions:
        raise fail("$.apiVersion", f"apiVersion {api_version!r} of kind {kind} is not one of {', '.join(cls.api_versions)}")
    try:
        obj = msgspec.convert(_without_server_fields(doc), cls, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        path, message = _split_validation_error(e)
        if message.startswith("Invalid enum value"):
            allowed = _literal_values(cls, path)
            if allowed:
                message += f"; expected one of {', '.join(allowed)}"
        raise fail(path, message) from None
    for path, message in unsupported_settings(obj):
        raise fail(path, message)
    return Resource(obj, source, index)


def _document_items(doc: Any, source: str, index: int) -> list[tuple[Any, str]]:
    """The objects of one YAML document with where each sits: itself ("$"), or the items of a
    Kubernetes `List` (what `kubectl get -o yaml` prints for several objects)."""
    if not (isinstance(doc, dict) and doc.get("kind") == "List"):
        return [(doc, "$")]
    if doc.get("apiVersion") != "v1":
        raise ConfigError(f"a List is apiVersion 'v1', got {doc.get('apiVersion')!r}", file=source, document=index,
                          kind="List", field_path="$.apiVersion")
    items = doc.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"expected a list of resources, got {type(items).__name__}", file=source,
                          document=index, kind="List", field_path="$.items")
    return [(item, f"$.items[{i}]") for i, item in enumerate(items)]


def _document_resources(doc: Any, source: str, index: int) -> list[Resource]:
    return [_convert(item, source, index, at) for item, at in _document_items(doc, source, index)]


def load_document(doc: Any, source: str = "<memory>", document: int = -1) -> Resource:
    """One already-parsed document (a mapping, e.g. from YAML or a control-plane message) -> Resource,
    with the same checks and errors as a file's document."""
    return _convert(doc, source, document)


def _yaml_message(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}" + (f" ({context})" if context else "")


def load_bytes(data: bytes | str, source: str = "<memory>") -> list[Resource]:
    """Every resource in a (multi-document) YAML text, a `List`'s items included. Empty documents are
    skipped but counted, so document indexes match positions in the file."""
    resources: list[Resource] = []
    index = 0
    docs = yaml.load_all(data, Loader=_StrictLoader)
    while True:
        try:
            doc = next(docs)
        except StopIteration:
            break
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_message(e), file=source, document=index) from None
        if doc is not None:
            resources.extend(_document_resources(doc, source, index))
        index += 1
    return resources


def duplicate_errors(resources: Iterable[Resource]) -> Iterator[ConfigError]:
    """One error for every resource whose kind, namespace and name an earlier one already has."""
    seen: dict[tuple[str, str, str], Resource] = {}
    for r in resources:
        first = seen.setdefault(r.key, r)
        if first is not r:
            yield r.error(
                "$.metadata.name",
                f"duplicate {r.kind} {r.namespace}/{r.name}: already defined in {first.file} document {first.document}",
            )


def check_duplicates(resources: Iterable[Resource]) -> None:
    for error in duplicate_errors(resources):
        raise error


def config_files(path: str | Path) -> list[Path]:
    """The YAML files a config path stands for: the file itself, or a directory's sorted *.yaml/*.yml."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
        if not files:
            raise ConfigError("directory holds no *.yaml or *.yml files", file=str(p))
        return files
    if not p.exists():
        raise ConfigError("no such file or directory", file=str(p))
    return [p]


def load_path(path: str | Path) -> list[Resource]:
    resources: list[Resource] = []
    for f in config_files(path):
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", file=str(f)) from None
        resources.extend(load_bytes(data, str(f)))
    check_duplicates(resources)
    return resources


# --------------------------------------------------------------------------------------------------
# Several sources at once, every problem collected (for `triomesh validate`)

STDIN = "-"


@dataclass(frozen=True, slots=True)
class DocumentError:
    """A problem that kept one document (or, for unparsable YAML, the rest of a file) from loading."""

    error: ConfigError
    line: int | None  # 1-based line in error.file, when known
    problem: Literal["yaml", "schema", "duplicate"]


@dataclass(frozen=True, slots=True)
class LoadedSources:
    """What several config sources hold: the resources that decoded, the documents that did not, and
    where each document's fields sit (to point a finding at a line)."""

    resources: list[Resource]
    errors: list[DocumentError]
    files: list[str]
    nodes: dict[tuple[str, int], yaml.Node]

    def line(self, file: str, document: int, field_path: str = "$") -> int | None:
        """1-based line of `field_path` (msgspec's "$.spec.http[0]" form) in a document; where the
        path goes deeper than the YAML does, the line of the deepest part that exists."""
        node = self.nodes.get((file, document))
        if node is None:
            return None
        line = node.start_mark.line
        for m in _PATH_TOKEN.finditer(field_path[1:]):
            key, index = m.group(1), m.group(2)
            if key is not None and isinstance(node, yaml.MappingNode):
                hit = next((kv for kv in node.value if isinstance(kv[0], yaml.ScalarNode) and kv[0].value == key), None)
                if hit is None:
                    break
                line, node = hit[0].start_mark.line, hit[1]
            elif index is not None and index.isdigit() and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
                node = node.value[int(index)]
                line = node.start_mark.line
            else:
                break
        return line + 1


def _collect_text(data: bytes, source: str, out: LoadedSources) -> None:
    """Decode every document of one text on its own; a YAML syntax error ends the file (the parser
    cannot resynchronise), a construction error (duplicate key) only its document."""
    loader = _StrictLoader(data)
    index = 0
    try:
        while True:
            try:
                if not loader.check_node():
                    break
                node = loader.get_node()
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                error = ConfigError(_yaml_message(e), file=source, document=index)
                out.errors.append(DocumentError(error, mark.line + 1 if mark is not None else None, "yaml"))
                return
            out.nodes[(source, index)] = node
            try:
                doc = loader.construct_document(node)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                error = ConfigError(_yaml_message(e), file=source, document=index)
                out.errors.append(DocumentError(error, mark.line + 1 if mark is not None else None, "yaml"))
            else:
                if doc is not None:
                    try:
                        items = _document_items(doc, source, index)
                    except ConfigError as e:
                        items = []
                        out.errors.append(DocumentError(e, out.line(source, index, e.field_path), "schema"))
                    for item, at in items:  # each item of a List on its own, like each document
                        try:
                            out.resources.append(_convert(item, source, index, at))
                        except ConfigError as e:
                            out.errors.append(DocumentError(e, out.line(source, index, e.field_path), "schema"))
            index += 1
    finally:
        loader.dispose()


def load_sources(paths: Sequence[str | Path], stdin: BinaryIO | None = None) -> LoadedSources:
    """Every resource of several files, directories (their *.yaml/*.yml, as `load_path`) and "-"
    (stdin, read once), with every per-document problem collected instead of raised, duplicates
    included. A path that does not exist or cannot be read is a ConfigError: nothing to check."""
    out = LoadedSources([], [], [], {})
    texts: list[tuple[str, bytes]] = []
    for path in paths:
        if str(path) == STDIN:
            if any(name == "<stdin>" for name, _ in texts):
                continue
            if stdin is None:
                raise ConfigError("no standard input to read", file="<stdin>")
            texts.append(("<stdin>", stdin.read()))
            continue
        for f in config_files(path):
            if any(name == str(f) for name, _ in texts):
                continue  # named twice (a file and its directory): loaded once
            try:
                texts.append((str(f), f.read_bytes()))
            except OSError as e:
                raise ConfigError(f"cannot read: {e.strerror}", file=str(f)) from e
    for name, data in texts:
        out.files.append(name)
        _collect_text(data, name, out)
    for error in duplicate_errors(out.resources):
        out.errors.append(DocumentError(error, out.line(error.file, error.document, error.field_path), "duplicate"))
    return out
