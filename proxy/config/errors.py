"""ConfigError: one precise, human-readable config problem (file, document, kind/name, field path)."""

from __future__ import annotations


class ConfigError(Exception):
    """A config problem a user can fix without guessing.

    str() is "FILE: document N (Kind ns/name): PATH: message". `document` is the 0-based index of the
    YAML document in FILE (-1 when the problem is the file itself); `name` is "namespace/name" ("" when
    the document has none); `field_path` uses msgspec's form, "$.spec.http[0].route[1].weight".
    """

    def __init__(
        self,
        message: str,
        *,
        file: str = "<memory>",
        document: int = -1,
        kind: str = "",
        name: str = "",
        field_path: str = "$",
    ) -> None:
        super().__init__(message)
        self.file = file
        self.document = document
        self.kind = kind
        self.name = name
        self.field_path = field_path
        self.message = message

    def __str__(self) -> str:
        where = self.file
        if self.document < 0 and self.field_path == "$":
            return f"{where}: {self.message}"  # a problem with the file itself
        if self.document >= 0:
            what = " ".join(p for p in (self.kind, self.name) if p)
            where += f": document {self.document}"
            if what:
                where += f" ({what})"
        return f"{where}: {self.field_path}: {self.message}"

    def __repr__(self) -> str:
        return f"ConfigError({str(self)!r})"
