"""Calibration data: re-iterable, streamed, validated sample by sample.

A calibration set yields ``{input_name: tensor}`` dicts, one per calibration batch, and can be
iterated more than once (PPQ's histogram observers take two passes). Nothing here keeps a list
of all tensors: samples are produced or loaded when iterated and dropped after use.

Sources :func:`resolve_calibration` accepts (what ``quantize(calibset=...)`` takes):

* ``None``: seeded random data (:class:`RandomCalibration`);
* a list, a torch ``DataLoader`` or any re-iterable of dicts (:class:`SampleCalibration`);
* a folder path: images in class subfolders (:class:`ImageFolderCalibration`) or ``.npy``/``.npz``
  files (:class:`ArrayFolderCalibration`);
* ``(source, transform_fn)``: any of the above, or any re-iterable, with ``transform_fn`` turning
  each item into a dict (:class:`TransformCalibration`, NNCF's ``Dataset`` shape);
* a :class:`CalibrationSet` built by hand, e.g. ``ImageFolderCalibration(root, transform=...)``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from maptools.errors import CalibrationError, MaptoolsError
from maptools.onnx_model import ModelInput, integer_range

__all__ = ["integer_range", "random_array", "CalibrationSet", "RandomCalibration", "SampleCalibration",
           "TransformCalibration", "FolderCalibration", "ImageFolderCalibration", "ArrayFolderCalibration",
           "ValidatedCalibration", "ProgressCalibration", "resolve_calibration", "MIN_SAMPLES", "IMAGENET_MEAN",
           "IMAGENET_STD"]

MIN_SAMPLES = 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARRAY_SUFFIXES = (".npy", ".npz")
_CHUNK = 1 << 20


class CalibrationSet:
    """Base of calibration sources: ``len()``, repeatable ``iter()``, and a JSON description."""

    kind = "abstract"

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Small JSON-able description (kind, count, and what identifies the content)."""
        return {"kind": self.kind, "count": len(self)}

    def content_hash(self, limit: int | None = None) -> str:
        """sha256 over the first ``limit`` (default all) samples' names, shapes, dtypes and bytes, streamed."""
        digest = hashlib.sha256()
        for index, sample in enumerate(self):
            if limit is not None and index >= limit:
                break
            for name in sorted(sample):
                t = torch.as_tensor(sample[name]).detach().cpu().contiguous()
                digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
                digest.update(t.numpy().tobytes())
        return digest.hexdigest()


class RandomCalibration(CalibrationSet):
    """Seeded random samples in each input's dtype; sample ``i`` depends only on ``(seed, i)``.

    Float inputs (float32 unless ``dtypes`` says otherwise) get standard-normal values; integer inputs
    (an image as uint8 bytes, say) uniform codes in ``[0, 255]`` (``[-128, 127]`` for int8), below
    ``limits[name]`` for an input that indexes a table; boolean inputs fair coin flips.
    """

    kind = "random"

    def __init__(self, shapes: Mapping[str, Sequence[int]], count: int, seed: int = 0,
                 dtypes: Mapping[str, np.dtype] | None = None, limits: Mapping[str, int] | None = None) -> None:
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.count = count
        self.seed = seed
        self.dtypes = {k: np.dtype((dtypes or {}).get(k, np.float32)) for k in self.shapes}
        self.limits = {k: int(v) for k, v in (limits or {}).items() if k in self.shapes and self.dtypes[k].kind in "iu"}

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.count):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            yield {name: _random(shape, self.dtypes[name], gen, self.limits.get(name))
                   for name, shape in self.shapes.items()}

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "seed": self.seed, "shapes": {k: list(v) for k, v in self.shapes.items()}}
        if any(d != np.float32 for d in self.dtypes.values()):
            described["dtypes"] = {k: d.name for k, d in self.dtypes.items()}
        if self.limits:
            described["limits"] = dict(self.limits)
        return described

    def content_hash(self, limit: int | None = None) -> str:
        """sha256 of what decides the samples (seed, shapes, dtypes, count): no sample is generated to hash them."""
        desc = {**self.describe(), "count": self.count if limit is None else min(limit, self.count)}
        return hashlib.sha256(repr(sorted(desc.items())).encode()).hexdigest()


def _random(shape: Sequence[int], dtype: np.dtype, gen: torch.Generator, limit: int | None = None) -> torch.Tensor:
    want = torch.from_numpy(np.zeros(0, dtype)).dtype
    if dtype.kind == "f":
        return torch.randn(tuple(shape), generator=gen).to(want)
    return torch.randint(*integer_range(dtype, limit), tuple(shape), generator=gen).to(want)


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: np.dtype = np.dtype(np.float32),
                 limit: int | None = None) -> np.ndarray:
    """Seeded random values of one input outside calibration (evaluation, simulation): standard normal, or
    integers in :func:`integer_range`, in ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(list(shape), dtype=np.float32).astype(dtype, copy=False)
    return rng.integers(*integer_range(dtype, limit), size=list(shape)).astype(dtype)


class SampleCalibration(CalibrationSet):
    """A user's re-iterable of ``{input_name: tensor | ndarray}`` dicts: a list, a torch DataLoader or Dataset...

    Each ``iter()`` must start over. Without ``__len__`` the items are counted in one streamed
    pass the first time ``len()`` is asked (give the object ``__len__`` to skip that pass).
    """

    kind = "samples"

    def __init__(self, samples: Iterable[Any] | Sequence[Any]) -> None:
        if isinstance(samples, Iterator):
            raise CalibrationError("calibset is a one-shot iterator (e.g. a generator); PPQ reads the data more than "
                                   "once.", "pass a list, or a re-iterable object such as a torch DataLoader.")
        self.samples = samples
        self._count: int | None = None

    def __len__(self) -> int:
        if self._count is None:
            try:
                self._count = len(self.samples)  # type: ignore[arg-type]
            except TypeError:  # no __len__ (or a DataLoader over an IterableDataset): count, streamed
                self._count = sum(1 for _ in self.samples)
        return self._count

    def __iter__(self) -> Iterator[Any]:
        yield from self.samples  # checked by ValidatedCalibration

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "type": type(self.samples).__name__}


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)[:200]


class TransformCalibration(CalibrationSet):
    """``transform(item)`` for each item of ``source``; it must return ``{input_name: tensor}``.

    NNCF's ``Dataset(data_source, transform_func)`` in maptools' terms, e.g. for a DataLoader
    of ``(image, label)`` batches: ``(loader, lambda batch: {'input': batch[0]})``.
    """

    kind = "transformed"

    def __init__(self, source: CalibrationSet, transform: Callable[[Any], Mapping[str, Any]]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Any]:
        for index, item in enumerate(self.source):
            try:
                yield self.transform(item)
            except MaptoolsError:
                raise
            except Exception as e:
                raise CalibrationError(f"transform_fn {_callable_name(self.transform)} raised on calibration sample "
                                       f"{index}: {type(e).__name__}: {e}",
                                       "make it return a dict like {'input': tensor} for every item.") from e

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "transform": _callable_name(self.transform), "source": self.source.describe()}


class FolderCalibration(CalibrationSet):
    """Files in a folder, one sample each, loaded only when iterated.

    ``content_hash`` covers the files' relative paths, sizes and bytes (streamed), so a changed,
    added or renamed file changes it; the folder's location does not.
    """

    def __init__(self, root: str | os.PathLike[str], input_name: str | None = None) -> None:
        self.root = Path(root)
        self.input_name = input_name

    @property
    def files(self) -> list[Path]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.files)

    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> Self:
        """A copy that feeds the model's single input (``input_name`` unless already set)."""
        if len(shapes) != 1:
            raise CalibrationError(f"{self.root} gives one tensor per sample, but the model has inputs "
                                   f"{sorted(shapes)}.",
                                   "save .npz files keyed by input name (in Python, a (source, transform_fn) pair "
                                   "that builds the dict works too).")
        bound = copy.copy(self)
        bound.input_name = self.input_name or next(iter(shapes))
        return bound

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root.resolve())}  # (as the manifest records the model)

    def _hash_extra(self) -> str:
        return ""

    def content_hash(self, limit: int | None = None) -> str:
        digest = hashlib.sha256(f"{self.kind}|{self._hash_extra()}|".encode())
        for path in self.files[:limit]:
            digest.update(f"{path.relative_to(self.root).as_posix()}|{path.stat().st_size}|".encode())
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()


#: image channels an image folder fills (grayscale, RGB)
_IMAGE_CHANNELS = (1, 3)


class ImageFolderCalibration(FolderCalibration):
    """Images in class subfolders (``root/<class>/<image>``, torchvision's ``ImageFolder``), batch 1.

    The input's layout is read from its shape: ``[1, C, H, W]`` (channels first) or ``[1, H, W, C]``
    (channels last, as TensorFlow/Keras exports take it), with C = 1 (grayscale) or 3 (RGB); channels
    first where both fit. ``transform`` turns a PIL image into one sample without its batch axis, in
    the input's layout (a tensor or an array); the default is Resize to the input's height and width (224x224
    for ResNet18), ToTensor, ImageNet Normalize (for grayscale, their means), and channels last where the input
    has them.
    """

    kind = "image_folder"

    def __init__(self, root: str | os.PathLike[str],
                 transform: Callable[[Any], torch.Tensor | np.ndarray] | None = None,
                 input_name: str | None = None) -> None:
        from torchvision.datasets import ImageFolder

        super().__init__(root, input_name)
        self.transform = transform
        self.size: tuple[int, int] | None = None
        self.channels = 3
        self.channels_last = False
        try:
            self._dataset = ImageFolder(str(self.root))
        except OSError as e:
            raise CalibrationError(f"no images found under {str(self.root)!r} ({e}).",
                                   "put images in class subfolders (root/<class>/<image>.png; one folder is "
                                   "enough), or .npy/.npz files directly in root.") from e

    @property
    def files(self) -> list[Path]:
        return [Path(p) for p, _ in self._dataset.samples]

    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> Self:
        bound = super().bind(shapes)
        shape = shapes[bound.input_name or ""]
        if len(shape) != 4 or shape[0] != 1:
            raise CalibrationError(f"an image folder gives [1, C, H, W] or [1, H, W, C] samples, but input "
                                   f"{bound.input_name!r} has shape {list(shape)}.",
                                   "use batch 1 in input_shapes, or pass a DataLoader.")
        if shape[1] in _IMAGE_CHANNELS:
            bound.channels, bound.size, bound.channels_last = shape[1], (shape[2], shape[3]), False
        elif shape[3] in _IMAGE_CHANNELS:
            bound.channels, bound.size, bound.channels_last = shape[3], (shape[1], shape[2]), True
        elif bound.transform is None:
            raise CalibrationError(f"input {bound.input_name!r} has shape {list(shape)}: neither axis 1 nor axis 3 "
                                   "holds 1 or 3 image channels.", "pass transform=... that makes a sample of that "
                                   "shape from an image, or a DataLoader of tensors.")
        return bound

    def _transform(self) -> Callable[[Any], torch.Tensor]:
        if self.transform is not None:
            return self.transform
        if self.size is None:
            raise CalibrationError(f"{type(self).__name__}({str(self.root)!r}) without a transform does not know the "
                                   "input size.", "pass it to quantize(), which sets it, or pass transform=...")
        from torchvision import transforms

        steps: list[Any] = [transforms.Resize(list(self.size))]
        if self.channels == 1:
            steps += [transforms.Grayscale(1), transforms.ToTensor(),
                      transforms.Normalize([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])]
        else:
            steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if self.channels_last:
            steps.append(transforms.Lambda(lambda x: x.permute(1, 2, 0).contiguous()))
        return transforms.Compose(steps)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        transform = self._transform()
        for index, (path, _) in enumerate(self._dataset.samples):
            try:
                x = transform(self._dataset.loader(path))
            except Exception as e:
                raise CalibrationError(f"calibration sample {index}: cannot read or transform image {path} "
                                       f"({type(e).__name__}: {e}).", "replace or remove that file" + (
                                           ", or fix the transform." if self.transform is not None else ".")) from e
            yield {self.input_name or "": x.unsqueeze(0) if isinstance(x, torch.Tensor) else np.expand_dims(x, 0)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classes": len(self._dataset.classes), "transform": self._transform_name()}

    def _transform_name(self) -> str:
        if self.transform is None:
            size = "x".join(map(str, self.size)) if self.size else "input size"
            return (f"default: Resize {size}, {'Grayscale, ' if self.channels == 1 else ''}ToTensor, ImageNet "
                    f"Normalize{', channels last' if self.channels_last else ''}")
        return repr(self.transform)[:500]

    def _hash_extra(self) -> str:
        return self._transform_name()


class ArrayFolderCalibration(FolderCalibration):
    """``.npy`` (one array for the single input) or ``.npz`` (arrays keyed by input name) files in ``root``.

    Files are read in name order; arrays must match ``input_shapes`` exactly, batch axis included.
    """

    kind = "array_folder"

    def __init__(self, root: str | os.PathLike[str], input_name: str | None = None) -> None:
        super().__init__(root, input_name)
        self._files = sorted(p for p in self.root.iterdir() if p.suffix in ARRAY_SUFFIXES and p.is_file())
        if not self._files:
            raise CalibrationError(f"no .npy or .npz files in {str(self.root)!r}.",
                                   "save one sample per file with numpy.save or numpy.savez.")

    @property
    def files(self) -> list[Path]:
        return self._files

    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> Self:
        return self if all(p.suffix == ".npz" for p in self._files) else super().bind(shapes)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, path in enumerate(self._files):
            try:
                if path.suffix == ".npy":
                    sample = {self.input_name or "": np.load(path, allow_pickle=False)}
                else:
                    with np.load(path, allow_pickle=False) as data:
                        sample = {k: data[k] for k in data.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise CalibrationError(f"calibration sample {index}: cannot read {path} ({e}).",
                                       "save it with numpy.save/numpy.savez (no pickled objects).") from e
            yield sample


class ValidatedCalibration(CalibrationSet):
    """Checks every sample of ``source`` against the model inputs as it streams past.

    Names, shapes, dtype and finiteness are checked; the error names the sample index.
    At most ``limit`` samples are yielded, and every pass must yield that many.
    """

    def __init__(self, source: CalibrationSet, inputs: Sequence[ModelInput],
                 shapes: Mapping[str, tuple[int, ...]], limit: int | None = None) -> None:
        self.source = source
        self.inputs = {i.name: i for i in inputs}
        self.shapes = dict(shapes)
        self.limit = len(source) if limit is None else min(limit, len(source))
        self.kind = source.kind

    def __len__(self) -> int:
        return self.limit

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        count = 0
        for index, sample in enumerate(self.source):
            if index >= self.limit:
                return
            yield self._check(index, sample)
            count += 1
        if count < self.limit:
            raise CalibrationError(f"the calibration source yielded {count} samples on this pass but reported "
                                   f"{len(self.source)}.", "make each iter() start over (PPQ reads the data more than "
                                   "once) and make len() match what it yields.")

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "used": self.limit}

    def content_hash(self, limit: int | None = None) -> str:
        """The source's own hash where it needs no decoding (files, seeds), else the validated tensors'."""
        n = self.limit if limit is None else min(limit, self.limit)
        if isinstance(self.source, (FolderCalibration, RandomCalibration)):
            return self.source.content_hash(n)
        return super().content_hash(n)

    def _check(self, index: int, sample: Any) -> dict[str, torch.Tensor]:
        where = f"calibration sample {index}"
        if isinstance(sample, (np.ndarray, torch.Tensor)) and len(self.inputs) == 1:
            sample = {next(iter(self.inputs)): sample}  # a single-input model's bare tensor
        if not isinstance(sample, Mapping):
            raise CalibrationError(f"{where} is a {type(sample).__name__}, not a dict of input name -> tensor.",
                                   f"yield dicts like {{{next(iter(self.inputs))!r}: tensor}}, or pass "
                                   "(source, transform_fn) with a transform_fn that returns one.")
        if set(sample) != set(self.inputs):
            raise CalibrationError(f"{where} has keys {sorted(sample)} but the model's inputs are "
                                   f"{sorted(self.inputs)}.", "key each tensor by its model input name.")
        out: dict[str, torch.Tensor] = {}
        for name, value in sample.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, torch.Tensor):
                raise CalibrationError(f"{where}[{name!r}] is a {type(value).__name__}, not a tensor.",
                                       "pass torch tensors or numpy arrays.")
            want_dtype = torch.from_numpy(np.zeros(0, self.inputs[name].dtype)).dtype
            if value.dtype != want_dtype:
                numpy_name = np.dtype(self.inputs[name].dtype).name
                raise CalibrationError(f"{where}[{name!r}] has dtype {value.dtype}, the model expects {want_dtype}.",
                                       f"save the files as {numpy_name} (numpy.save(path, array.astype("
                                       f"numpy.{numpy_name})))." if isinstance(self.source, ArrayFolderCalibration)
                                       else f"convert it, e.g. tensor.to({want_dtype}) or array.astype("
                                       f"numpy.{numpy_name}).")
            if tuple(value.shape) != self.shapes[name]:
                raise CalibrationError(f"{where}[{name!r}] has shape {list(value.shape)}, expected "
                                       f"{list(self.shapes[name])} (from input_shapes).",
                                       "make every sample match input_shapes, batch axis included.")
            if value.is_floating_point() and value.numel() and not _finite(value):
                raise CalibrationError(f"{where}[{name!r}] contains NaN or inf.",
                                       "clean the data or drop that sample.")
            out[name] = value
        return out


def _sample_like(item: Any) -> bool:
    """``item`` could be one calibration sample (a dict of tensors, or a bare tensor or array)."""
    return isinstance(item, (Mapping, torch.Tensor, np.ndarray))


def _finite(value: torch.Tensor) -> bool:
    """No NaN or inf in ``value``: its minimum and maximum (one pass; NaN propagates) are finite."""
    return all(math.isfinite(float(v)) for v in torch.aminmax(value))


class ProgressCalibration(CalibrationSet):
    """Calls ``report(done, total)`` as each sample is handed out (``done`` counts across passes)."""

    def __init__(self, source: CalibrationSet, total: int, report: Callable[[int, int], None]) -> None:
        self.source = source
        self.total = total
        self.report = report
        self.done = 0
        self.kind = source.kind

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for sample in self.source:
            self.done += 1
            self.report(self.done, self.total)
            yield sample


class CastCalibration(CalibrationSet):
    """Samples with each input converted to the dtype the prepared model takes (a float16 input of the
    original is float32 after preparation)."""

    def __init__(self, source: CalibrationSet, dtypes: Mapping[str, torch.dtype]) -> None:
        self.source = source
        self.dtypes = dict(dtypes)
        self.kind = source.kind

    def __len__(self) -> int:
        return len(self.source)

    def cast(self, sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtypes[k]) if k in self.dtypes else v for k, v in sample.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for sample in self.source:
            yield self.cast(sample)


def resolve_calibration(calibset: Any, shapes: Mapping[str, tuple[int, ...]], calib_steps: int,
                        seed: int, dtypes: Mapping[str, np.dtype] | None = None,
                        limits: Mapping[str, int] | None = None) -> CalibrationSet:
    """Turn what the user passed as ``calibset`` into a CalibrationSet (not yet validated); random data
    (``calibset=None``) comes in the inputs' ``dtypes``, integer inputs below their ``limits``."""
    if calibset is None:
        return RandomCalibration(shapes, calib_steps, seed, dtypes, limits)
    if isinstance(calibset, FolderCalibration):
        return calibset.bind(shapes)
    if isinstance(calibset, CalibrationSet):
        return calibset
    if isinstance(calibset, (str, os.PathLike)):
        root = Path(calibset)
        if not root.is_dir():
            raise CalibrationError(f"calibration folder {str(root)!r} does not exist or is not a folder.",
                                   "pass a folder of images in class subfolders or of .npy/.npz files.")
        has_arrays = any(p.suffix in ARRAY_SUFFIXES for p in root.iterdir())
        folder = ArrayFolderCalibration(root) if has_arrays else ImageFolderCalibration(root)
        return folder.bind(shapes)
    if isinstance(calibset, Mapping):
        raise CalibrationError("calibset is a single dict; calibration needs a collection of samples.",
                               "pass a list of such dicts (at least 8).")
    if isinstance(calibset, tuple) and len(calibset) == 2 and callable(calibset[1]):
        return TransformCalibration(resolve_calibration(calibset[0], shapes, calib_steps, seed), calibset[1])
    if isinstance(calibset, tuple) and len(calibset) == 2 and not _sample_like(calibset[0]) \
            and not _sample_like(calibset[1]):
        raise CalibrationError(f"calibset is a (source, transform_fn) pair whose transform_fn is a "
                               f"{type(calibset[1]).__name__}, not a function.",
                               "pass a callable that turns one item of the source into {input_name: tensor}.")
    if isinstance(calibset, (Iterable, Sequence)) or hasattr(calibset, "__getitem__") and hasattr(calibset, "__len__"):
        return SampleCalibration(calibset)  # also a map-style torch Dataset (read by index)
    raise CalibrationError(f"calibset of type {type(calibset).__name__} is not supported.",
                           "pass None (seeded random data), a list or DataLoader of {input_name: tensor} dicts, "
                           "a folder path, or a (source, transform_fn) pair.")
