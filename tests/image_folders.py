"""Image folders (`root/{train,test}/<class>/<i>.png`) written for tests."""
import os

import numpy as np
from PIL import Image


def write_folder(root, classes=("cat", "dog"), per_class=(3, 2), size=(6, 5), mode="RGB", seed=0):
    """root/{train,test}/<class>/<i>.png; returns {split: [(image array, label), ...]} in file order."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in zip(("train", "test"), per_class):
        rows = []
        for label, cls in enumerate(classes):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(count):
                channels = 3 if mode == "RGB" else 1
                array = rng.integers(0, 256, size=(size[0], size[1], channels), dtype=np.uint8)
                Image.fromarray(array if channels == 3 else array[..., 0], mode).save(
                    root / split / cls / f"{i}.png"
                )
                rows.append((array, label))
        written[split] = rows
    return written
