"""Consistent random renaming of entity names, the warm start's augmentation.

A renamed demonstration keeps its structure (question, searches, retrieved passages, answer) but every
invented name in it is replaced, consistently, by another name word drawn at random. Its answer can
then only be found by copying it from the retrieved text, so a warm start on renamed copies teaches a
model to search and copy instead of memorising the world's facts. A tiny model trained on the originals
memorises them (train EM 1.0, held-out EM about 0.3 on the small world; see docs/training.md).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence


class EntityRenamer:
    """Draws consistent name substitutions for a set of texts and applies them.

    Args:
        names: the name words to replace (any case; matched as whole words, case-insensitively).
        substitutes: the words drawn as replacements; defaults to ``names``.
        seed: seeds the draws.
    """

    def __init__(self, names: Iterable[str], substitutes: Sequence[str] | None = None, seed: int = 0) -> None:
        self.names = sorted({name.lower() for name in names if name.strip()})
        if not self.names:
            raise ValueError("EntityRenamer needs at least one name word")
        self.substitutes = sorted({word.lower() for word in substitutes}) if substitutes else list(self.names)
        self._rng = random.Random(seed)
        # Longest first, so a name that extends another ("Varnell" / "Varnel") is matched whole.
        alternatives = "|".join(re.escape(name) for name in sorted(self.names, key=len, reverse=True))
        self._pattern = re.compile(rf"\b(?:{alternatives})\b", flags=re.IGNORECASE)

    def draw_mapping(self, texts: Iterable[str]) -> dict[str, str]:
        """A fresh one-to-one substitution for every name word occurring in ``texts``."""
        found = sorted({match.group(0).lower() for text in texts for match in self._pattern.finditer(text)})
        if len(found) > len(self.substitutes):
            raise ValueError(f"{len(found)} names to replace but only {len(self.substitutes)} substitutes")
        return dict(zip(found, self._rng.sample(self.substitutes, len(found)), strict=True))

    def apply(self, mapping: Mapping[str, str], text: str) -> str:
        """``text`` with every mapped name replaced, keeping whether it was capitalised."""

        def substitute(match: re.Match[str]) -> str:
            word = match.group(0)
            new = mapping.get(word.lower())
            if new is None:
                return word
            return new.capitalize() if word[:1].isupper() else new

        return self._pattern.sub(substitute, text)
