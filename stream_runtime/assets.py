"""Where the embedded models ship: ``assets/<name>`` of a source checkout (editable install), or
``stream_runtime/assets/<name>`` of an installed wheel (package data)."""

from __future__ import annotations

from pathlib import Path

_REPO_ASSETS = Path(__file__).resolve().parents[1] / "assets"  # <repo>/stream_runtime/assets.py -> <repo>/assets


def asset_candidates(name: str) -> list[Path]:
    """Folders searched for the asset ``name``, in order."""
    import stream_runtime

    return [_REPO_ASSETS / name, Path(stream_runtime.__file__).resolve().parent / "assets" / name]


def find_asset(name: str, marker: str) -> Path | None:
    """The first of :func:`asset_candidates` that holds the file ``marker`` (None when none does)."""
    for folder in asset_candidates(name):
        if (folder / marker).is_file():
            return folder
    return None
