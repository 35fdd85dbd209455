"""examples/llama/train.py with a wider model: the user script of tests/acceptance/test_model_parallel.py.

The training loop, data and logging are the example's own; only the model is wider, so that its
parameters and AdamW state outgrow one small virtual GPU (the test sets the memory cap).
"""
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "llama"))

import train  # noqa: E402

# About 0.9 M parameters (3.6 MB in float32): with gradients and AdamW's two moments, 14.5 MB.
train.Llama = functools.partial(train.Llama, dim=192, hidden=512)

if __name__ == "__main__":
    train.main()
