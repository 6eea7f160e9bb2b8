"""One visual language for every figure the toolkit draws (overlays, grids, curves).

NOTE for the attribution helper: this file was started by the lead for ``save_figure``; extend it, keep
``save_figure``'s behaviour (metadata-free PNG/SVG) and signature.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["save_figure"]


def save_figure(fig: plt.Figure, path: str | Path, formats: tuple[str, ...] | None = None,
                dpi: int = 150) -> list[Path]:
    """Save ``fig`` without metadata (no software/date text chunks) and close it.

    ``path``'s suffix picks the format; ``formats`` (e.g. ``("png", "svg")``) writes one file per format beside it.
    SVGs get no date and a fixed hash salt, so the same figure gives the same bytes. Returns the written paths.
    """
    from gestalt_xai.runs import atomic_write_bytes

    path = Path(path)
    kinds = formats or (path.suffix.lstrip(".") or "png",)
    written = []
    for kind in kinds:
        target = path.with_suffix(f".{kind}")
        import io

        buf = io.BytesIO()
        if kind == "svg":
            with matplotlib.rc_context({"svg.hashsalt": "gestalt-xai"}):
                fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        elif kind == "pdf":
            fig.savefig(buf, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
        else:
            fig.savefig(buf, format=kind, dpi=dpi, metadata={"Software": None} if kind == "png" else None)
        atomic_write_bytes(target, buf.getvalue())
        written.append(target)
    plt.close(fig)
    return written
