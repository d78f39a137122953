"""A compiled Snapshot as bytes and back: a proxy compiles its config once and its workers load it.

Theory of operation: a Snapshot is frozen dataclasses, tuples, mappings and Istio structs, which pickle
as they are, plus predicates compiled into closures (route matches, CORS origins), which pickle cannot
name. Each such closure is tagged by `rebuilt_by(closure, factory, *args)` with the module-level factory
and the plain arguments that made it; the pickler writes that recipe in place of the function, and
loading calls the factory again, so a worker gets the very closures the request path calls, for a few
microseconds per route instead of a compile. A closure without a recipe is refused when encoding
(`SnapshotNotTransferable`), never silently dropped.

The bytes cross only the private socketpair between a supervisor and the workers it started from the
same installed code, never a network or a file: pickle's rule (load only what you produced) holds.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any, Callable, TypeVar

from proxy.config.snapshot import Snapshot

F = TypeVar("F", bound=Callable[..., Any])
_RECIPE = "__snapshot_recipe__"


class SnapshotNotTransferable(Exception):
    """The snapshot holds an object that cannot be rebuilt in another process (a bug in compile)."""


def rebuilt_by(closure: F, factory: Callable[..., Any], *args: Any) -> F:
    """Tag `closure` as `factory(*args)`, so a worker rebuilds it by calling the factory again. The
    module-level functions pickle can name (`matchers._always`) are left untagged, and so is a closure
    tagged already (a factory that returned one of its arguments, e.g. an OR of one predicate): its
    own recipe does not refer to itself."""
    if ("<locals>" in closure.__qualname__ or closure.__name__ == "<lambda>") and not hasattr(closure, _RECIPE):
        setattr(closure, _RECIPE, (factory, args))
    return closure


def _rebuild(factory: Callable[..., Any], args: tuple) -> Any:
    return factory(*args)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.FunctionType:
            recipe = getattr(obj, _RECIPE, None)
            if recipe is not None:
                return (_rebuild, recipe)
            if "<locals>" in obj.__qualname__ or obj.__name__ == "<lambda>":
                raise SnapshotNotTransferable(f"{obj.__module__}.{obj.__qualname__} has no rebuild recipe")
        return NotImplemented


def encode_snapshot(snapshot: Snapshot) -> bytes:
    out = io.BytesIO()
    try:
        _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(snapshot)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise SnapshotNotTransferable(f"snapshot {snapshot.version} cannot be handed to workers: {e}") from e
    return out.getvalue()


def decode_snapshot(data: bytes) -> Snapshot:
    snapshot = pickle.loads(data)
    if not isinstance(snapshot, Snapshot):
        raise TypeError(f"expected a Snapshot, got {type(snapshot).__name__}")
    return snapshot
