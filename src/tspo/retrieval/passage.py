"""What a corpus line says beyond ``Doc``'s fields, kept so the wire answers as the corpus was written.

Two details of Search-R1 corpora that :class:`~tspo.doc.Doc` alone cannot carry:

* an id written as a JSON integer (``{"id": 7, ...}``) must come back as ``7``, not ``"7"``:
  :class:`JsonIntId` is a ``str`` (so every ``Doc.id`` stays a string and compares equal to ``"7"``)
  that remembers it was an integer;
* ``contents`` whose first line is empty (``"\\nbody"``: an empty title) must come back byte for byte;
  ``Doc(title="", text="body")`` would give ``"body"``, which a Search-R1 client reads as a passage
  *titled* "body". :class:`EmptyTitleDoc` keeps the empty first line.
"""

from __future__ import annotations

from dataclasses import dataclass

from tspo.doc import Doc

__all__ = ["EmptyTitleDoc", "JsonIntId", "doc_from_contents", "json_id", "passage_id"]

# orjson and most JSON readers hold integers in 64 bits; larger ids stay strings.
_INT_RANGE = range(-(2**63), 2**64)


class JsonIntId(str):
    """A passage id that was a JSON integer in the corpus (or on the wire)."""

    __slots__ = ()


def passage_id(raw: object) -> str:
    """``Doc.id`` of a JSON id: strings as given, integers as :class:`JsonIntId`."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw in _INT_RANGE:
        return JsonIntId(raw)
    return str(raw)


def json_id(doc_id: str) -> str | int:
    """The JSON value of ``doc_id``: an integer again for a :class:`JsonIntId`."""
    return int(doc_id) if type(doc_id) is JsonIntId else doc_id


@dataclass(frozen=True)
class EmptyTitleDoc(Doc):
    """A passage whose ``contents`` is ``"\\n" + text``: an empty title line, kept as written."""

    @property
    def contents(self) -> str:
        return "\n" + self.text


def doc_from_contents(doc_id: str, contents: str, score: float = 0.0) -> Doc:
    """Split ``contents`` (first line = title) so that ``doc.contents == contents`` byte for byte."""
    title, sep, text = contents.partition("\n")
    if not sep:
        return Doc(id=doc_id, title="", text=contents, score=score)
    if not title:
        return EmptyTitleDoc(id=doc_id, title="", text=text, score=score)
    return Doc(id=doc_id, title=title, text=text, score=score)
