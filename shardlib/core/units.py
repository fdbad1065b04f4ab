"""Human-readable sizes: the one formatter every table and message of the project uses."""

from __future__ import annotations


def format_bytes(n: float, digits: int = 1) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units; whole bytes below 1 KiB, ``digits`` decimals above)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
