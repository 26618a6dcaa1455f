"""Invented names built from syllables, with controlled look-alikes (the world's distractors).

Every name token is new to any pretrained model, so answers cannot be known without searching. Stems
are unique across the whole world (a surname is never also a city), except where a distractor reuses
one on purpose: people sharing a first name or a surname, a surname one letter away from another
(``Varnel`` / ``Varnell``), two cities on one stem (``Tessel`` / ``Port Tessel``), two organisations on
one stem (``Kelvaro Bank`` / ``Kelvaro Press``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
# Consonant clusters only start a name ("Brandel", not "Debrastro"): easier to read and to copy.
INITIAL_ONSETS = (*ONSETS, "br", "dr", "kr", "tr", "st")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
CODAS = ("n", "r", "l", "s", "m", "n", "r", "l")
COUNTRY_SUFFIXES = ("ia", "land", "mark", "ora")
ORG_KINDS = ("Systems", "Bank", "Press", "Labs", "Motors", "Foods", "Mining", "Shipping")
# City name forms: "{}" is the bare stem. The weights are for a fresh stem.
CITY_FORMS = ("{}", "{} City", "Port {}", "New {}")
CITY_FORM_WEIGHTS = (0.6, 0.2, 0.15, 0.05)

# Common English function words a syllable name could spell; BM25 tokenizers drop stopwords, which
# would make such a name unsearchable.
_ENGLISH_WORDS = frozenset(
    """
    about above after again against also been before being below between both could does doing down
    during each from further have having here hers herself himself into itself just more most myself
    once only other ours over same should some such than that their theirs them then there these they
    this those through under until very were what when where which while whom will with would your
    yours born city port new capital country company founded married works based lies home raised
    """.split()  # noqa: SIM905 - a word list reads better as text
)


# Words of entity names that are kinds or forms, not names: shared by many entities.
GENERIC_NAME_WORDS = frozenset(
    word.lower()
    for word in (*ORG_KINDS, *(part for form in CITY_FORMS for part in form.split() if part != "{}"))
)


def name_words(names: Iterable[str]) -> set[str]:
    """The invented words of entity names, lowercased: ``"Port Tessel"`` gives ``{"tessel"}``."""
    return {word.lower() for name in names for word in name.split() if word.lower() not in GENERIC_NAME_WORDS}


class NameFactory:
    """Draws unique syllable names from one ``random.Random``; ``distractors`` sets the look-alike rate."""

    def __init__(self, rng: random.Random, distractors: float, reserved: set[str]) -> None:
        self.rng = rng
        self.distractors = distractors
        self._reserved = {word.lower() for word in reserved} | _ENGLISH_WORDS
        self._used: set[str] = set()
        self._first_names: list[str] = []
        self._surnames: list[str] = []
        self._full_names: set[str] = set()
        self._org_stems: dict[str, list[str]] = {}
        self._city_stems: dict[str, list[str]] = {}

    # -- stems --------------------------------------------------------------------------------------

    def _syllable(self, coda_probability: float, initial: bool = False) -> str:
        coda = self.rng.choice(CODAS) if self.rng.random() < coda_probability else ""
        return self.rng.choice(INITIAL_ONSETS if initial else ONSETS) + self.rng.choice(VOWELS) + coda

    def _acceptable(self, stem: str, max_length: int = 8) -> bool:
        key = stem.lower()
        return 4 <= len(stem) <= max_length and key not in self._used and key not in self._reserved

    def _claim(self, stem: str) -> str:
        self._used.add(stem.lower())
        return stem

    def stem(self, syllables: tuple[int, ...] = (2, 3)) -> str:
        """A fresh capitalised stem of 2 or 3 syllables, unused anywhere in the world."""
        while True:
            count = self.rng.choice(syllables)
            parts = [self._syllable(0.3, initial=i == 0) for i in range(count - 1)] + [self._syllable(0.6)]
            stem = "".join(parts).capitalize()
            if self._acceptable(stem):
                return self._claim(stem)

    def variant(self, stem: str) -> str | None:
        """A fresh stem one letter away from ``stem`` (``Varen`` -> ``Varenn``, ``Varena``, ``Voren``)."""
        if stem[-1] in "aeiou":
            candidates = [stem + "n", stem + "s"]
        elif stem[-1] in "lns":
            candidates = [stem + stem[-1], stem + "a", stem + "o"]
        else:
            candidates = [stem + "a", stem + "o"]
        candidates += [
            stem[:i] + v + stem[i + 1 :]
            for i, c in enumerate(stem)
            if c in "aeiou"
            for v in "aeiou"
            if v != c
        ]
        self.rng.shuffle(candidates)
        for candidate in candidates:
            if self._acceptable(candidate, max_length=9):
                return self._claim(candidate)
        return None

    def _look_alike(self) -> bool:
        return self.rng.random() < self.distractors

    # -- entities -----------------------------------------------------------------------------------

    def person(self) -> tuple[str, str]:
        """``(first name, surname)``, unique as a pair; a look-alike reuses a part or varies a surname."""
        for _ in range(50):
            if self._first_names and self._look_alike():
                first = self.rng.choice(self._first_names)
            else:
                first = self.stem((2,))
                self._first_names.append(first)
            surname: str | None = None
            draw = self.rng.random()
            if self._surnames and draw < self.distractors:
                surname = self.rng.choice(self._surnames)
            elif self._surnames and draw < 1.5 * self.distractors:
                surname = self.variant(self.rng.choice(self._surnames))
                if surname is not None:
                    self._surnames.append(surname)
            if surname is None:
                surname = self.stem((2, 3))
                self._surnames.append(surname)
            if f"{first} {surname}" not in self._full_names:
                self._full_names.add(f"{first} {surname}")
                return first, surname
        # A high distractor rate on a small pool can exhaust the combinations: fall back to fresh stems.
        first, surname = self.stem((2,)), self.stem((2, 3))
        self._first_names.append(first)
        self._surnames.append(surname)
        self._full_names.add(f"{first} {surname}")
        return first, surname

    def org(self) -> tuple[str, str]:
        """``(name, stem)``, e.g. ``("Kelvaro Bank", "Kelvaro")``; a look-alike shares another's stem."""
        shared = [stem for stem, kinds in self._org_stems.items() if len(kinds) < len(ORG_KINDS)]
        if shared and self._look_alike():
            stem = self.rng.choice(shared)
        else:
            stem = self.stem()
            self._org_stems[stem] = []
        kind = self.rng.choice([k for k in ORG_KINDS if k not in self._org_stems[stem]])
        self._org_stems[stem].append(kind)
        return f"{stem} {kind}", stem

    def city(self) -> tuple[str, str]:
        """``(name, stem)``, e.g. ``("Port Tessel", "Tessel")``; a look-alike shares another's stem."""
        shared = [stem for stem, forms in self._city_stems.items() if len(forms) < len(CITY_FORMS)]
        if shared and self._look_alike():
            stem = self.rng.choice(shared)
            form = self.rng.choice([f for f in CITY_FORMS if f not in self._city_stems[stem]])
        else:
            stem = self.stem()
            self._city_stems[stem] = []
            form = self.rng.choices(CITY_FORMS, weights=CITY_FORM_WEIGHTS)[0]
        self._city_stems[stem].append(form)
        return form.format(stem), stem

    def country(self) -> str:
        """A country name: a fresh stem plus a country-like suffix (``Orvania``, ``Kelmark``)."""
        while True:
            base = (self._syllable(0.2, initial=True) + self._syllable(0.0)).capitalize()
            name = base.rstrip("aeiou") + self.rng.choice(COUNTRY_SUFFIXES)
            if self._acceptable(name, max_length=10):
                return self._claim(name)
