"""The confusion matrix as a person reads it: labelled classes, counts, each row's recall.

Drawn with matplotlib (a ``Figure`` with the Agg canvas: no pyplot state, no display), the
new model's matrix beside the published model's when both were scored on the same images,
so that a class that got worse shows as a row that lost its diagonal. Each cell holds its
count and is shaded by its share of the row (the true class's images); each row ends with
that class's recall. matplotlib is imported inside the functions: the DAG file never loads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from headpose.training import labels

_BIN = ("neg", "ctr", "pos")  # labels.class_names' negative / centre / positive, short enough for a tick


def tick_labels() -> list[str]:
    """``pan neg / tilt ctr`` ... in class-index order (class = pan_bin * 3 + tilt_bin)."""
    return [f"pan {_BIN[p]} / tilt {_BIN[t]}" for p in range(labels.NUM_BINS) for t in range(labels.NUM_BINS)]


def write_confusion_png(
    path: str | Path,
    matrix: Sequence[Sequence[int]],
    title: str,
    champion: Sequence[Sequence[int]] | None = None,
    champion_title: str = "",
) -> Path:
    """Draw ``matrix`` (rows = true class), and ``champion``'s beside it when given; a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(matrix, title)] + ([(champion, champion_title)] if champion is not None else [])
    figure = Figure(figsize=(8.6 * len(panels), 7.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (counts, heading) in zip(axes, panels):
        image = _panel(ax, counts, heading)
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.6, pad=0.02)
    colorbar.set_label("share of the true class's images")
    target = Path(path)
    figure.savefig(target, format="png", dpi=90)
    return target


def _panel(ax: Any, counts: Sequence[Sequence[int]], heading: str) -> Any:
    import numpy as np

    grid = np.asarray(counts, dtype=np.int64)
    rows = grid.sum(axis=1)
    share = np.divide(grid, rows[:, None], out=np.zeros(grid.shape, dtype=float), where=rows[:, None] > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = tick_labels()
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(heading, fontsize=10)
    for (row, column), count in np.ndenumerate(grid):
        ax.text(column, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if share[row, column] > 0.55 else "black")
    for row, total in enumerate(rows):  # each row's recall, beside the matrix
        recall = f"{grid[row, row] / total:.2f} ({grid[row, row]}/{total})" if total else "-"
        ax.text(len(names) - 0.3, row, recall, ha="left", va="center", fontsize=8)
    ax.text(len(names) - 0.3, -0.9, "recall", ha="left", va="center", fontsize=8, fontweight="bold")
    return image


def recall_changes(
    after: Mapping[str, float | None], before: Mapping[str, float | None] | None,
    images: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Each class's recall before (the published model) and after (the new one), with the change.

    ``after`` and ``before`` map class names (``labels.class_names``) to recall; the class
    with the largest drop is marked ``worst``. Rows are in class-index order.
    """
    rows = []
    for index, name in enumerate(labels.class_names()):
        new, old = after.get(name), (before or {}).get(name)
        change = new - old if new is not None and old is not None else None
        rows.append({"class": name, "label": tick_labels()[index], "images": (images or {}).get(name),
                     "before": old, "after": new, "change": change, "worst": False})
    dropped = [row for row in rows if row["change"] is not None and row["change"] < 0]
    if dropped:
        min(dropped, key=lambda row: row["change"])["worst"] = True
    return rows
