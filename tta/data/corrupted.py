"""Corrupted datasets: on the fly (:class:`CorruptedDataset`) and exported in the
CIFAR-10-C layout (:func:`export_corrupted`)."""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tta._atomic import atomic_file
from tta.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, PRESETS, SEVERITIES, corrupt, default_preset

__all__ = ["CorruptedDataset", "export_corrupted"]

logger = logging.getLogger(__name__)


class CorruptedDataset(Dataset):
    r"""Wrap a map-style dataset of ``(image, label)`` and corrupt every image.

    Item ``i`` is ``corrupt(base[i] image, corruption, severity, preset, seed,
    index_offset=i)``: the same as corrupting the whole set in one call, whatever
    the order of access, batch size or number of workers. Labels (and any further
    fields of the item) pass through unchanged.

    Args:
        base: map-style dataset whose items are ``(image, label, ...)`` with
            ``image`` a uint8 or float [0, 1] tensor ``(C, H, W)``.
        corruption: one of ``tta.CORRUPTIONS`` or ``tta.EXTRA_CORRUPTIONS``.
        severity: 1 to 5.
        seed: base seed of the corruption noise.
        preset: parameter table (``"cifar"``, ``"tiny"``, ``"imagenet"``); ``None``
            chooses by image size.

    Shape:
        - ``dataset[i]``: ``(image, label)``, ``image`` with the dtype and shape of
          the base image.

    Examples::

        >>> base = tta.data.get_dataset("digits")
        >>> ds = CorruptedDataset(base, "fog", severity=3)
        >>> image, label = ds[0]
    """

    def __init__(self, base: Dataset, corruption: str, severity: int, seed: int = 0, preset: str | None = None):
        valid = CORRUPTIONS + EXTRA_CORRUPTIONS
        if corruption not in valid:
            raise ValueError(f"unknown corruption {corruption!r}; valid choices: {', '.join(valid)}")
        if isinstance(severity, bool) or severity not in SEVERITIES:
            raise ValueError(f"invalid severity {severity!r}; valid choices: {', '.join(map(str, SEVERITIES))}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(PRESETS)}")
        self.base = base
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.preset = preset

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} items")
        item = self.base[index]
        if not isinstance(item, (tuple, list)) or not isinstance(item[0], Tensor):
            raise TypeError(f"base items must be (image tensor, label, ...) tuples, got {type(item).__name__}")
        image = corrupt(item[0], self.corruption, self.severity, preset=self.preset, seed=self.seed, index_offset=index)
        return (image, *item[1:])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(corruption={self.corruption!r}, severity={self.severity}, "
            f"seed={self.seed}, preset={self.preset!r}, num_examples={len(self)})"
        )


MANIFEST_FORMAT = 1


def _complete(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether ``path`` is a readable ``.npy`` file of this shape and dtype."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == dtype


def _raise_no_space(error: OSError, path: Path, nbytes: int) -> None:
    """Re-raises a full disk (or quota) while writing ``path`` as a clear error; other errors
    unchanged. Call in an ``except OSError`` block."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise error
    free = shutil.disk_usage(path.parent).free
    raise OSError(error.errno, f"no space left to write {path} ({nbytes / 1e6:.1f} MB, {free / 1e6:.1f} MB "
                               f"free on that file system): free space or choose another out_dir, then run "
                               f"again to resume ({error.strerror})") from error


def _remove_stale(out: Path, name: str) -> None:
    """Removes the temporary files of ``name`` left by killed writers: the caller holds the
    file's lock, so no live writer owns them."""
    for tmp in out.glob(f".{glob.escape(name)}.*.tmp"):
        logger.info("removing %s, left by an interrupted export", tmp)
        tmp.unlink(missing_ok=True)


def _differences(recorded: Any, arguments: dict[str, Any]) -> str:
    if not isinstance(recorded, dict):
        return "no readable record of the arguments it was made with"
    keys = [k for k in arguments if recorded.get(k) != arguments[k]] + sorted(set(recorded) - set(arguments))
    return "; ".join(f"{k}={recorded.get(k)!r} there, {arguments.get(k)!r} now" for k in keys)


def _state(path: Path, arguments: dict[str, Any], shape: tuple[int, ...]) -> str:
    """``"done"`` (finished with these arguments), ``"todo"`` (absent, unfinished or damaged)
    or a message naming the conflict: a finished file made with other arguments, or without
    a record of them (see :func:`export_corrupted`)."""
    if not path.exists():
        return "todo"
    manifest = path.with_suffix(".json")
    try:
        recorded = json.loads(manifest.read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    complete = _complete(path, shape, np.dtype(np.uint8))
    if recorded == arguments:
        return "done" if complete else "todo"
    if recorded is None and not complete:
        return "todo"  # a foreign file of another shape or a damaged one: not a finished export
    return f"{path} was made with other arguments: {_differences(recorded, arguments)}"


def _write_rows(path: Path, shape: tuple[int, ...], batches: Iterator[np.ndarray]) -> None:
    """Writes a uint8 ``.npy`` of ``shape`` from C-ordered row blocks, atomically, without a
    memory map: the space is reserved up front (``os.posix_fallocate``), so a full disk is an
    ``OSError`` before the work and never a ``SIGBUS`` during it."""
    nbytes = int(np.prod(shape))
    try:
        with atomic_file(path, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            f.flush()
            try:
                os.posix_fallocate(f.fileno(), 0, f.tell() + nbytes)
            except AttributeError:  # not on this platform: write() still reports ENOSPC
                pass
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
            written = 0
            for rows in batches:
                f.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
                written += rows.size
            if written != nbytes:
                raise RuntimeError(f"{path}: wrote {written} bytes of {nbytes}")
    except OSError as e:
        _raise_no_space(e, path, nbytes)


def export_corrupted(
    images: Tensor,
    labels: Tensor,
    out_dir: str | Path,
    corruptions: Sequence[str],
    *,
    preset: str | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    rgb: bool = False,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[Path]:
    r"""Write a corrupted copy of a dataset in the CIFAR-10-C layout.

    For every corruption, ``<out_dir>/<corruption>.npy`` holds a uint8 array of shape
    ``(5 N, H, W, C)`` (NHWC), severity-major: rows ``(s-1) N .. s N - 1`` are
    severity ``s``; ``<out_dir>/labels.npy`` holds the ``5 N`` labels (uint8 when
    they fit, else int64). Row ``(s-1) N + i`` is ``corrupt(images[i], corruption, s,
    preset, seed, index_offset=i)``.

    Resume: beside each file, ``<corruption>.json`` records every argument its content
    depends on (``"arguments"``: corruption, severities, seed, the resolved preset, the stored
    channels, N, the image shape, sha256 of the images, of the labels and of the corruption
    code) plus ``source`` and the tta version. A file whose record equals this call's is skipped; an
    absent, unreadable or wrongly shaped file without a record is (re)written; a finished file
    made with other arguments (or without a record) is a conflict: the call raises
    ``ValueError`` listing every difference before anything is written, unless ``overwrite``,
    which redoes those files. ``labels.npy`` conflicts when it holds other labels.

    Safety: files are written to a temporary name and renamed when complete (the record
    first, so a killed run leaves nothing that looks finished). Each file is produced under a
    lock (``filelock``, ``<out_dir>/.<file>.lock``); holding it, temporary files of that file
    left by killed runs are removed, while a file another live process is writing is waited
    for after the others. Space is reserved before a file is computed: a full disk raises
    ``OSError`` (``ENOSPC``) naming the file and the free space, and leaves nothing behind.

    Args:
        images: uint8 tensor :math:`(N, C, H, W)`, ``N >= 1``, ``C`` in {1, 3}.
        labels: integer tensor :math:`(N,)`.
        out_dir: output directory (created).
        corruptions: names from ``tta.CORRUPTIONS + tta.EXTRA_CORRUPTIONS``.
        preset: parameter table; ``None`` chooses by image size.
        seed: base seed of the corruption noise.
        batch_size: images per :func:`tta.corrupt` call (results do not depend on it).
        rgb: store one-channel images with 3 equal channels (for readers that
            expect CIFAR's ``(N, 32, 32, 3)``); the corruption itself runs in grey.
        overwrite: redo files made with other arguments instead of refusing.
        source: JSON-able description of the data (dataset, split, root), recorded in the
            manifests for people; not compared (the images' hash is).
        progress: show tqdm progress bars.

    Returns:
        The paths of the corruption files, in the order of ``corruptions``.

    Raises:
        ValueError: bad arguments, or conflicts with existing files (without ``overwrite``).
        OSError: a full disk (``ENOSPC``/``EDQUOT``) or another write error.
    """
    from tta.evaluation.results import corruption_code_hash, tensor_hash, write_json  # lazy: no cycle

    valid = CORRUPTIONS + EXTRA_CORRUPTIONS
    for name in corruptions:
        if name not in valid:
            raise ValueError(f"unknown corruption {name!r}; valid choices: {', '.join(valid)}")
    if len(set(corruptions)) != len(corruptions):
        raise ValueError(f"corruptions contains duplicates: {list(corruptions)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ValueError(f"images must be uint8 (N, C, H, W) with N >= 1 and C in (1, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(PRESETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"invalid seed {seed!r}; it must be a non-negative int")
    out = Path(out_dir)
    n, c, h, w = images.shape
    channels = 3 if rgb else c
    label_array = labels.cpu().numpy()
    fits = label_array.min() >= 0 and label_array.max() < 256
    label_array = np.tile(label_array.astype(np.uint8 if fits else np.int64), len(SEVERITIES))
    labels_path = out / "labels.npy"
    shape = (len(SEVERITIES) * n, h, w, channels)
    common = {"format": MANIFEST_FORMAT, "severities": list(SEVERITIES), "seed": seed,
              "preset": preset or default_preset(h, w), "channels": channels, "num_examples": n,
              "image_shape": [c, h, w], "images_sha256": tensor_hash(images),
              "labels_sha256": tensor_hash(labels.long()), "code_sha256": corruption_code_hash()}
    arguments = {name: {"corruption": name, **common} for name in corruptions}

    def labels_state() -> str:
        try:
            stored = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError):
            return "todo"  # absent or unreadable: not a finished export
        if not np.array_equal(stored, label_array):
            return f"{labels_path} holds other labels"
        return "done" if stored.dtype == label_array.dtype else "todo"

    # refuse before writing anything
    conflicts = [m for m in [labels_state()] + [_state(out / f"{k}.npy", arguments[k], shape) for k in corruptions]
                 if m not in ("done", "todo")]
    if conflicts and not overwrite:
        raise ValueError(f"{out} holds results of another export:\n  " + "\n  ".join(conflicts)
                         + "\nchoose another out_dir, or pass overwrite=True to redo these files")
    out.mkdir(parents=True, exist_ok=True)

    def produce(name: str) -> None:  # called holding the file's lock
        _remove_stale(out, f"{name}.npy")
        _remove_stale(out, f"{name}.json")
        if name == "labels":
            state = labels_state()
        else:
            state = _state(out / f"{name}.npy", arguments[name], shape)
        if state == "done":
            logger.info("%s exists, skipped", out / f"{name}.npy")
            return
        if state != "todo" and not overwrite:  # another process finished it meanwhile
            raise ValueError(f"{state}; choose another out_dir, or pass overwrite=True")
        if name == "labels":
            try:
                with atomic_file(labels_path, "wb") as f:
                    np.save(f, label_array, allow_pickle=False)
            except OSError as e:
                _raise_no_space(e, labels_path, label_array.nbytes)
            return
        path, manifest = out / f"{name}.npy", out / f"{name}.json"
        manifest.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        write_json(manifest, {"file": path.name, "arguments": arguments[name], "shape": list(shape),
                              "source": dict(source or {}), "tta_version": _version()})
        try:
            _write_rows(path, shape, _corrupted_rows(images, name, preset, seed, batch_size, channels, progress))
        except BaseException:
            manifest.unlink(missing_ok=True)
            raise
        logger.info("wrote %s", path)

    waiting = []
    for name in ["labels", *corruptions]:
        lock = FileLock(out / f".{name}.npy.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waiting.append((name, lock))  # another process is writing it: do the others first
            continue
        try:
            produce(name)
        finally:
            lock.release()
    for name, lock in waiting:
        logger.info("waiting for another process writing %s", out / f"{name}.npy")
        with lock:
            produce(name)
    return [out / f"{name}.npy" for name in corruptions]


def _corrupted_rows(images: Tensor, name: str, preset: str | None, seed: int, batch_size: int, channels: int,
                    progress: bool) -> Iterator[np.ndarray]:
    """The rows of ``<name>.npy`` in file order: severity-major batches, NHWC uint8."""
    n = len(images)
    with tqdm(total=len(SEVERITIES) * n, desc=name, unit="img", disable=not progress) as bar:
        for s in SEVERITIES:
            for start in range(0, n, batch_size):
                batch = images[start : start + batch_size]
                y = corrupt(batch, name, s, preset=preset, seed=seed, index_offset=start).permute(0, 2, 3, 1)
                yield y.expand(-1, -1, -1, channels).cpu().numpy()
                bar.update(len(batch))


def _version() -> str:
    import tta

    return tta.__version__
