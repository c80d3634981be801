"""Pictures of a classifier's test results: the confusion matrix and the images it gets wrong."""
import os
from typing import Sequence

import numpy as np

from distrnn.run.files import save_figure


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def confusion_matrix(path: str, counts: np.ndarray, classes: Sequence[str], title: str) -> None:
    """Rows: true class, columns: predicted; each cell shows its count, coloured by the share of
    its row (so classes of any size read alike)."""
    plt = _pyplot()
    totals = counts.sum(axis=1, keepdims=True)
    shares = counts / np.maximum(totals, 1)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(counts):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if shares[row, col] > 0.5 else "black")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, [f"{name} ({100 * shares[i, i]:.1f}%)" for i, name in enumerate(classes)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (accuracy)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    fig.tight_layout()
    save_figure(fig, path)


def misclassified(path: str, split, wrong: Sequence, classes: Sequence[str], title: str, columns: int = 6) -> None:
    """A grid of the images in `wrong` ([(index, predicted class)]), each titled with its true and
    predicted labels; a note instead when there are none."""
    plt = _pyplot()
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows + 0.6), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (index, predicted) in zip(axes.ravel(), wrong):
        ax.imshow(split.images[index], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"#{index}\ntrue: {classes[split.labels[index]]}\npred: {classes[predicted]}", fontsize=8)
    if not wrong:
        axes[0, 0].text(0, 0.5, "no test image misclassified", fontsize=12)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def test_results(save_path: str, data, title: str, tested, name: str) -> None:
    """The confusion matrix and the misclassified images of a run's test (a trainer.Evaluation)."""
    confusion_matrix(os.path.join(save_path, "confusion_matrix.png"), tested.confusion, data.classes,
                     f"{title} test, {name}: accuracy {100 * tested.accuracy:.2f}%")
    misclassified(os.path.join(save_path, "misclassified.png"), data.test, tested.misclassified, data.classes,
                  f"{title} test images the {name} model gets wrong")
