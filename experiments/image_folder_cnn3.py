r"""cnn3 on your own images: the experiment to copy for an image folder.

Layout: ROOT/train/<class>/*.png|jpg|jpeg and ROOT/test/<class>/* (the same class folders in
both). Classes are the train subfolders in sorted order (label i = the i-th name, recorded in
the run's dataset.json). Every image must have one size, or set dataset.image_size=(H, W) to
resize them all when the folder is prepared; grayscale folders give 1 channel, others 3.
Normalisation (per-channel mean/std) is measured on the train split. 10% of the training
images are held out for validation.

Try it on real images without any of your own (mnist5k written out as PNGs):
  python scripts/export_image_folder.py mnist5k /tmp/mnist5k_pngs
  jaxaccel train --config experiments/image_folder_cnn3.py --workdir runs/folder \
      --config.dataset.path=/tmp/mnist5k_pngs
Your own, resized to 32x32:
  jaxaccel train --config experiments/image_folder_cnn3.py --workdir runs/mine \
      --config.dataset.path=/data/my_images --config.dataset.image_size=(32,32)
"""
from jaxaccel.config import default_config


def get_config():
    config = default_config()
    config.dataset.name = "image_folder"
    config.dataset.path = ""  # --config.dataset.path=ROOT
    config.dataset.validation_split = 0.1
    config.model.name = "cnn3"
    config.batch_size = 64
    config.num_steps = 400
    config.optimizer.lr = 2e-3
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_steps = 50
    config.eval_every = 100
    return config
