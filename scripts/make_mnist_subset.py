"""Write src/fewstep/assets/mnist_subset.npz: the data the demo and its tests need after a plain install.

MNIST test set (Y. LeCun, C. Cortes, C. Burges; CC BY-SA 3.0). Split used everywhere in fewstep:
images 0..8999 train (the teacher was trained on them), 9000..9999 held out for evaluation.
The asset keeps the first 3,000 training digits and all 1,000 held-out ones.

    python scripts/make_mnist_subset.py ../shared/data/mnist
"""

import gzip
import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1])
images = np.frombuffer(gzip.open(root / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(root / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
out = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "assets" / "mnist_subset.npz"
np.savez_compressed(out, train_images=images[:3000], train_labels=labels[:3000],
                    eval_images=images[9000:], eval_labels=labels[9000:])
print(out, out.stat().st_size, "bytes")
