"""Write a built-in dataset as an image folder (ROOT/{train,test}/<class>/<i>.png).

A real, offline stand-in for your own images, to try the `image_folder` path end to end:

    .venv/bin/python scripts/export_image_folder.py mnist5k /tmp/mnist5k_pngs
    .venv/bin/jaxaccel train --config experiments/image_folder_cnn3.py --workdir runs/folder \\
        --config.dataset.path=/tmp/mnist5k_pngs
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

from jaxaccel import data


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(data.BUILTIN_SPECS), help="a built-in dataset")
    p.add_argument("root", help="folder to write (must not exist yet)")
    args = p.parse_args(argv)
    if os.path.exists(args.root):
        p.error(f"{args.root} already exists")
    spec = data.dataset_spec(args.dataset)
    for split in ("train", "test"):
        images, labels = data.read_arrays(data.get_source(args.dataset, split),
                                          np.arange(len(data.get_source(args.dataset, split))))
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(args.root, split, spec.names()[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                os.path.join(folder, f"{i:05d}.png"))
        print(f"{split}: {len(images)} images in {os.path.join(args.root, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
