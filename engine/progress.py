"""Progress bars on stderr for long work (loading, generation, scoring)."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False
) -> tqdm:
    """A tqdm bar on stderr (iterate it, or use it as a context manager); hidden when ``disable`` or for one item."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable or (total is not None and total <= 1),
                leave=False)  # fmt: skip
