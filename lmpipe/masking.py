"""Personal data out of the corpus: e-mail addresses, URLs, IP addresses, card numbers and phone numbers replaced by
typed placeholders (`<email>`, `<url>`, `<ip>`, `<card>`, `<phone>`) before anything is tokenized.

    clean: {mask: [email, url, ip, card, phone]}     # params.yaml; [] (the default) masks nothing

The clean stage (lmpipe/recipes/clean.py) runs every corpus document, labelled text and conversation turn through
one `Masker` and counts each kind in clean.metrics (`mask.<kind>`). Kinds are matched in MASK_KINDS' order, so an
address inside a URL is one `<url>`, and a card number (13-19 digits passing the Luhn check) is not also a phone.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, get_args

from lmpipe.names import MaskKind

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "url": re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()]+[^\s<>\"'().,;:!?]"),
    "ip": re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]|\.\d)"),
    "card": re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])"),
}
MASK_KINDS: tuple[str, ...] = get_args(MaskKind)
"""What `clean.mask` may name (lmpipe.names.MaskKind), in the order they are matched."""
assert MASK_KINDS == tuple(PATTERNS)


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _accept(kind: str, found: str) -> bool:
    """The checks a pattern alone cannot make: a card's length and Luhn digit; a phone's digit count and shape."""
    digits = re.sub(r"\D", "", found)
    if kind == "card":
        return 13 <= len(digits) <= 19 and _luhn(digits)
    if kind == "phone":  # 9-15 digits, written as a number is dialled: a leading + or (, or separators between groups
        return 9 <= len(digits) <= 15 and (found[0] in "+(" or bool(re.search(r"\d[ .-]\d", found)))
    return True


class Masker:
    """Replace the `kinds` in texts with `<kind>`; `counts` adds up what was replaced."""

    def __init__(self, kinds: list[str] | tuple[str, ...]) -> None:
        self.kinds = [k for k in MASK_KINDS if k in kinds]
        self.counts: Counter = Counter({k: 0 for k in self.kinds})

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def _replacer(self, kind: str) -> Callable[[re.Match], str]:
        def replace(match: re.Match) -> str:
            if not _accept(kind, match.group(0)):
                return match.group(0)
            self.counts[kind] += 1
            return f"<{kind}>"

        return replace

    def __call__(self, text: str) -> str:
        for kind in self.kinds:
            text = PATTERNS[kind].sub(self._replacer(kind), text)
        return text
