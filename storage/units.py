"""Byte counts as people read them. Its own module, importing nothing of ours, so that every module of the
storage layer (errors and tiers included) can use it without importing another."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: for error messages and reports."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
