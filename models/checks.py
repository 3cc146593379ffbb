"""Small checks and shapes shared by training, sampling and serving, each written once.

`pow2_bucket` rounds a size up to a power of two so a handful of compiled programs serve every request size;
`check_token_ids` refuses token ids outside a vocabulary (an out-of-range id would silently gather a wrong
embedding row on device); `first_line` is what an error shows a client: one line, never a traceback.
"""

from __future__ import annotations

import numpy as np


def pow2_bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= n (at least `minimum`, at most `maximum`)."""
    size = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return size if maximum is None else min(size, maximum)


def check_token_ids(tokens, vocab_size: int, where: str, *, what: str = "token id", error=ValueError) -> None:
    """Raise `error("{where}: {what} T is outside the vocabulary [0, V)")` for the first id outside it, or
    `error("{where}: no tokens")` for an empty sequence."""
    ids = np.asarray(tokens)
    if ids.size == 0:
        raise error(f"{where}: no tokens")
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        raise error(f"{where}: {what} {int(ids[outside][0])} is outside the vocabulary [0, {vocab_size})")


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an error's message (`default`, else the error's type name, when empty)."""
    return (str(error).strip().splitlines() or [type(error).__name__ if default is None else default])[0]
