"""Progress bars on stderr for long work (loading, generation, scoring)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False) -> tqdm:
    """A tqdm bar on stderr, usable as a context manager; hidden when ``disable`` or for tiny jobs."""
    return tqdm(total=total, desc=desc, unit=unit, disable=disable or (total is not None and total <= 1), leave=False)
