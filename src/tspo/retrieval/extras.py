"""The optional packages of dense retrieval (the ``dense`` extra), imported with an error that says what
is missing and how to install it, instead of a bare ``No module named 'faiss'``."""

from __future__ import annotations

import importlib
from types import ModuleType

DENSE_INSTALL = "pip install 'tspo[dense]' (from a clone: pip install -e '.[dense]')"
#: module name -> the package that provides it
DENSE_PACKAGES = {
    "faiss": "faiss-cpu (or a faiss GPU build)",
    "sentence_transformers": "sentence-transformers",
}


def import_dense_dependency(module: str) -> ModuleType:
    """``import module`` for dense retrieval; an :class:`ImportError` naming the package and the install
    command when it fails (the original error is kept in the message: a broken install reads differently
    from a missing one)."""
    if module not in DENSE_PACKAGES:
        raise ValueError(f"{module!r} is not a dense-retrieval dependency ({', '.join(DENSE_PACKAGES)})")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"dense retrieval needs {DENSE_PACKAGES[module]}, which cannot be imported ({err}): {DENSE_INSTALL}"
        ) from err
