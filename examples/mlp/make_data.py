"""Regenerate data.csv, the sample data of the MLP example (deterministic: same file every run).

Four classes of points in 16 dimensions: each class is a Gaussian cloud around its own centre,
pushed through a fixed nonlinearity so that a linear model is not enough.
"""
from pathlib import Path

import numpy as np

ROWS, FEATURES, CLASSES, SEED = 1024, 16, 4, 1234


def main():
    rng = np.random.default_rng(SEED)
    centres = rng.normal(0.0, 1.5, size=(CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, size=ROWS)
    points = centres[labels] + rng.normal(0.0, 1.0, size=(ROWS, FEATURES))
    features = np.tanh(points) + 0.1 * points ** 2
    rows = np.column_stack([features, labels])
    header = ",".join([f"x{i}" for i in range(FEATURES)] + ["label"])
    np.savetxt(Path(__file__).with_name("data.csv"), rows, delimiter=",", header=header,
               comments="", fmt=["%.5f"] * FEATURES + ["%d"])


if __name__ == "__main__":
    main()
