"""Write a tiny ImageNet-C in the released layout, ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, for smoke runs.

The corruptions are the real ones from the ``imagecorruptions`` package (the Hendrycks definitions packaged for
arbitrary image sizes, >= 32 px), applied to any class-per-folder image set (by default the synthetic one of
``repro.data.imagefolder``) and written as JPEGs like the released benchmark (the evaluation reads JPEGs on disk,
never in-memory corruptions).

``imagecorruptions`` 1.1.2 predates numpy 2, scikit-image 0.19+, SciPy 2 and setuptools without ``pkg_resources``;
the loader below bridges those API removals without touching the corruption definitions themselves, and seeds the one
corruption (impulse_noise) that would otherwise draw from an unseeded generator.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
import warnings
import zlib
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from repro.core.errors import ReproError

# One corruption of each family, all fast on 32-64 px images (glass_blur is ~100x slower than the others).
SMOKE_CORRUPTIONS = ("gaussian_noise", "motion_blur", "snow", "contrast", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
JPEG_QUALITY = 85  # hendrycks' make_imagenet_c.py saves with quality=85, optimize=True
MIN_SIZE = 32  # imagecorruptions refuses smaller images


def _resource_filename(package: str, name: str) -> str:
    """``pkg_resources.resource_filename`` for a module or package name (the one call imagecorruptions makes)."""
    module = importlib.import_module(package)
    return str(Path(module.__file__).parent / name)


def _install_compat_shims() -> None:
    try:
        import pkg_resources  # noqa: F401  (setuptools < 81 still ships it)
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    if not hasattr(np, "float_"):  # removed in numpy 2; fog's plasma fractal allocates with it
        np.float_ = np.float64  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import scipy.ndimage.interpolation  # noqa: F401  (deprecated alias, to be removed in SciPy 2)
        except ImportError:
            import scipy.ndimage

            sys.modules["scipy.ndimage.interpolation"] = scipy.ndimage


def _gaussian_with_multichannel(image: np.ndarray, sigma: float = 1.0, multichannel: Optional[bool] = None, **kwargs):
    """scikit-image >= 0.19 renamed ``multichannel=True`` to ``channel_axis=-1`` (gaussian_blur, glass_blur)."""
    from skimage.filters import gaussian

    if multichannel:
        kwargs["channel_axis"] = -1
    return gaussian(image, sigma=sigma, **kwargs)


def _seeded_random_noise(image: np.ndarray, **kwargs) -> np.ndarray:
    """skimage's ``random_noise`` draws from a fresh unseeded generator (impulse_noise); seed it from numpy's global
    generator so that ``_numpy_seed`` makes every corruption reproducible."""
    from skimage.util import random_noise

    kwargs.setdefault("rng", int(np.random.randint(2**31)))
    return random_noise(image, **kwargs)


def _skimage_view() -> types.SimpleNamespace:
    """What the corruptions module reaches through its ``sk`` alias, with ``random_noise`` seeded."""
    import skimage.color

    return types.SimpleNamespace(util=types.SimpleNamespace(random_noise=_seeded_random_noise), color=skimage.color)


def load_imagecorruptions() -> ModuleType:
    """Import ``imagecorruptions`` with the compatibility shims in place (patched in its own module only)."""
    _install_compat_shims()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            package = importlib.import_module("imagecorruptions")
    except ImportError as err:
        raise ReproError(f"the synthetic ImageNet-C needs `pip install imagecorruptions` ({err})") from None
    package.corruptions.gaussian = _gaussian_with_multichannel
    package.corruptions.sk = _skimage_view()
    return package


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    # imagecorruptions draws from numpy's global generator; seed it per image and put the caller's state back.
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """One corrupted copy (uint8 HxWx3) of a uint8 HxWx3 image, deterministic given ``seed``."""
    package = load_imagecorruptions()
    if corruption not in package.get_corruption_names("all"):
        raise ReproError(f"unknown corruption {corruption!r}; known: {package.get_corruption_names('all')}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise ReproError(f"imagecorruptions needs images of at least {MIN_SIZE} px, got {image.shape[:2]}")
    with _numpy_seed(seed):
        out = package.corrupt(image, severity=severity, corruption_name=corruption)
    # A few corruptions return the frame cropped or padded by a pixel on odd sizes; keep the input's geometry.
    return np.asarray(Image.fromarray(out).resize(image.shape[1::-1])) if out.shape != image.shape else out


# --------------------------------------------------------------------------------------------- sources


def default_class_names(num_classes: int) -> list[str]:
    """The first ImageNet-1k WNIDs, so that synthetic folders look like the real ones."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())[:num_classes]


def _source_images(source: Path) -> list[tuple[str, Path]]:
    """(class name, file) for every image of a class-per-folder set, in sorted order."""
    suffixes = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
    items = [
        (class_dir.name, path)
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir())
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in suffixes
    ]
    if not items:
        raise ReproError(f"no images found under {source} (expected <class>/<image> files)")
    return items


def write_imagenet_c_folder(
    source: str | Path,
    out_root: str | Path,
    corruptions: Sequence[str] = SMOKE_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
) -> Path:
    """Corrupt every image of a class-per-folder set into ``<out_root>/<corruption>/<severity>/<class>/<name>.JPEG``."""
    source, out_root = Path(source), Path(out_root)
    if not source.is_dir():
        raise ReproError(f"source image folder {source} does not exist")
    items = _source_images(source)
    for class_name, path in items:
        image = np.asarray(Image.open(path).convert("RGB"))
        for corruption in corruptions:
            for severity in severities:
                image_seed = zlib.crc32(f"{seed}/{corruption}/{severity}/{class_name}/{path.name}".encode())
                out = corrupt_image(image, corruption, severity, image_seed)
                folder = out_root / corruption / str(severity) / class_name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(out).save(folder / f"{path.stem}.JPEG", quality=JPEG_QUALITY, optimize=True)
    return out_root


def write_synthetic_imagenet_c(
    root: str | Path,
    corruptions: Sequence[str] = SMOKE_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    num_classes: int = 2,
    images_per_class: int = 2,
    image_size: int = 32,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> Path:
    """Synthetic clean images (``<root>/_clean/val/<wnid>/``, the learnable images of
    ``repro.data.imagefolder``) corrupted into the ImageNet-C layout under ``<root>``."""
    from repro.data.imagefolder import write_synthetic_imagefolder

    root = Path(root)
    names = list(class_names) if class_names is not None else default_class_names(num_classes)
    clean = write_synthetic_imagefolder(
        root / "_clean", classes=names, per_class=images_per_class, size=image_size, seed=seed, splits=("val",)
    )
    return write_imagenet_c_folder(clean / "val", root, corruptions, severities, seed)
