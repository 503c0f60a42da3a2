"""Release numbers compared by their leading numbers, and the few specifier forms pyproject
uses (``>=1.106,<1.111,!=1.107.*``), without a dependency on ``packaging``."""

from __future__ import annotations

import re

__all__ = ["version_tuple", "satisfies"]

_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9.]*?)(\.\*)?\s*$")


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.110.2"`` → ``(1, 110, 2)``: at most four numeric parts, stopping at the first part
    with no leading number (``"1.81.0rc1"`` → ``(1, 81, 0)``)."""
    parts = []
    for part in version.split(".")[:4]:
        digits = re.match(r"\d*", part).group()  # type: ignore[union-attr]
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets every comma-separated clause of ``spec`` (``>=``, ``>``,
    ``<=``, ``<``, ``==``, ``!=``; ``==X.*`` / ``!=X.*`` match by prefix). Missing parts count
    as 0 (``1.106`` is ``1.106.0``). Raises ValueError for a clause of another form."""
    have = version_tuple(version)
    for clause in filter(str.strip, spec.split(",")):
        found = _CLAUSE.match(clause)
        if found is None:
            raise ValueError(f"unsupported version clause: {clause.strip()!r}")
        op, number, star = found.group(1), version_tuple(found.group(2)), found.group(3)
        if star:
            if op not in ("==", "!="):
                raise ValueError(f"unsupported version clause: {clause.strip()!r}")
            if (have[:len(number)] == number) != (op == "=="):
                return False
            continue
        width = max(len(have), len(number))
        left, right = _padded(have, width), _padded(number, width)
        if not {">=": left >= right, "<=": left <= right, "==": left == right,
                "!=": left != right, ">": left > right, "<": left < right}[op]:
            return False
    return True


def _padded(parts: tuple[int, ...], width: int) -> tuple[int, ...]:
    return parts + (0,) * (width - len(parts))
