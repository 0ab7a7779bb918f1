"""A folder of PNGs in torchvision's ImageFolder layout, ROOT/<class>/**/<image>.png, read as uint8 arrays.

Classes are the sub-folders of ROOT sorted by name, and a class's index is its position in that order, as
`torchvision.datasets.ImageFolder` gives it (`find_classes`). Files directly under ROOT are not classes and are
ignored, as ImageFolder ignores them: this project's sample.py writes ROOT/card.json there. Within a class the
images are read in ImageFolder's order (sorted `os.walk`, sorted file names), so the set comes out class by class.

Two refusals where ImageFolder would silently mislabel or lose data:
- class folders named by numbers must be numbered by their index in sorted order (`0`..`9`, or zero-padded
  `00`..`25` as sample.py writes them): `1`..`10`, or unpadded `0`..`25` (where `10` sorts before `2`), stop
  with an error instead of shifting labels;
- other image files (JPEG, BMP, ...) stop with an error: only lossless 8-bit PNG is read. Non-image files are
  ignored, as ImageFolder ignores them.

PNG modes: `1`, `L`, `LA` are read as one channel (`L`); `RGB`, `RGBA`, `P`, `PA` as three (`RGB`, alpha dropped);
16-bit and float modes are refused.
"""

import os

import numpy as np
from PIL import Image

from ldm.errors import UserError

OTHER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
GRAY_MODES, COLOUR_MODES = ("1", "L", "LA"), ("RGB", "RGBA", "P", "PA")


def find_classes(root):
    """Sorted names of the sub-folders of `root` (torchvision's `find_classes`), checked as described above."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UserError(f"--synthetic {root} is a folder without class sub-folders; expected ImageFolder layout "
                        f"{root}/<class>/<image>.png, as sample.py --out {root}/ writes it")
    if all(name.isdigit() for name in classes):
        wrong = [(i, name) for i, name in enumerate(classes) if int(name) != i]
        if wrong:
            i, name = wrong[0]
            raise UserError(f"--synthetic {root}: class folders are numbers, but in sorted order ({', '.join(classes[:12])}"
                            f"{' ...' if len(classes) > 12 else ''}) folder {name!r} would get class index {i}; number "
                            f"them 0..{len(classes) - 1} and zero-pad them to one width (as sample.py does)")
    return classes


def class_files(root, name):
    """The PNG paths of class folder `root/name`, in ImageFolder's order; other image files are refused."""
    paths = []
    for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
        for file in sorted(files):
            ext = os.path.splitext(file)[1].lower()
            if ext == ".png":
                paths.append(os.path.join(folder, file))
            elif ext in OTHER_IMAGE_EXTENSIONS:
                raise UserError(f"--synthetic {root}: {os.path.join(folder, file)} is not a PNG; only lossless "
                                f"8-bit PNG images are read, convert it")
    if not paths:
        raise UserError(f"--synthetic {root}: class folder {name!r} holds no .png image")
    return paths


def read_png(path):
    """The PNG at `path` as uint8 (C, H, W), C = 1 for grayscale modes, 3 for colour ones."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise UserError(f"--synthetic: {path} is a {img.format} file named .png; write PNG images")
            if img.mode in GRAY_MODES:
                return np.asarray(img.convert("L"), dtype=np.uint8)[None]
            if img.mode in COLOUR_MODES:
                return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except OSError as e:
        raise UserError(f"--synthetic: {path} is not a readable PNG ({type(e).__name__})") from None
    raise UserError(f"--synthetic: {path} has PNG mode {img.mode!r} (16-bit or float); write 8-bit grayscale or RGB")


def read_image_folder(root):
    """(x uint8 (N, C, H, W), y int64 (N,), info) from the ImageFolder at `root`; y = class folder index.

    Every image must have the size and channel count of the first; a mismatch names both files.
    """
    classes = find_classes(root)
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = class_files(root, name)
        paths += files
        labels += [index] * len(files)
    first = read_png(paths[0])
    x = np.empty((len(paths), *first.shape), dtype=np.uint8)
    for i, path in enumerate(paths):
        image = first if i == 0 else read_png(path)
        if image.shape != first.shape:
            raise UserError(f"--synthetic {root}: {path} has (C, H, W) {image.shape} but {paths[0]} has {first.shape}; "
                            f"all images must share one size and channel count")
        x[i] = image
    info = {"format": "ImageFolder", "classes": classes,
            "labels": "index of the class folder in sorted order (torchvision ImageFolder)"}
    return x, np.asarray(labels, dtype=np.int64), info
