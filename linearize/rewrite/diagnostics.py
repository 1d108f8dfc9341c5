"""Located errors and warnings for rule files: `file:line:col: message (hint)`, one paragraph, no traceback.

Every problem a rule file can have is reported as a `RuleError` (the file cannot be used) or a `RuleWarning` (it can,
but probably does not say what its author meant). Both carry the file, the 1-based line and column, what is wrong and,
where there is one, the fix ("did you mean `window`?").
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class Mark:
    """A position in a rule file (1-based line and column). `quoted`: the scalar there starts with a quote."""

    source: str
    line: int = 0
    column: int = 0
    quoted: bool = False

    def __str__(self) -> str:
        if not self.line:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"

    def shifted(self, columns: int) -> "Mark":
        """The mark `columns` characters into the scalar that starts here (past its opening quote)."""
        return Mark(self.source, self.line, self.column + columns + (1 if self.quoted else 0))


def _one_paragraph(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class RuleError(ValueError):
    """A rule set that cannot be used; the message names the file, line and column, and the fix."""

    def __init__(self, message: str, mark: Optional[Mark] = None, hint: str = ""):
        self.mark = mark
        self.problem = _one_paragraph(message)
        self.hint = _one_paragraph(hint)
        super().__init__(self._format())

    @property
    def source(self) -> str:
        return self.mark.source if self.mark else ""

    @property
    def line(self) -> int:
        return self.mark.line if self.mark else 0

    @property
    def column(self) -> int:
        return self.mark.column if self.mark else 0

    def _format(self) -> str:
        where = f"{self.mark}: " if self.mark else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.problem}{hint}"


@dataclass(frozen=True)
class RuleWarning:
    """A rule file that loads but is probably not what its author meant."""

    message: str
    mark: Optional[Mark] = None
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.mark}: " if self.mark else ""
        hint = f" ({_one_paragraph(self.hint)})" if self.hint else ""
        return f"{where}{_one_paragraph(self.message)}{hint}"


def suggest(word, choices: Iterable[str]) -> str:
    """`did you mean `x`?` for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else ""


def joined(hint: str, rest: str) -> str:
    """Two hint parts as one string: "did you mean `x`? targets: a, b"."""
    if hint and rest:
        return f"{hint} {rest}" if hint.endswith("?") else f"{hint}; {rest}"
    return hint or rest
