"""Checkpoints: what they hold, atomic writes, safe reads, and rebuilding the model from one.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so `torch.load(weights_only=True)`
reads it and a file from elsewhere cannot run code on load. Its keys (the `Checkpoint` TypedDict below is the one
place they are defined; `CHECKPOINT_KEYS` lists them):

    format_version  int, FORMAT_VERSION of the writer (a newer one is refused with a clear message)
    version         str, the detector package version
    model_yaml      dict, the resolved model config: `build_model(model_yaml)` rebuilds the architecture
    model           state_dict of the trained model (weights and buffers, anchors included)
    ema             `ModelEMA.state_dict()`: {'module': state_dict, 'updates', 'decay', 'tau'}, or None
    optimizer       `Optimizer.state_dict()` (param groups carry their 'name'), or None in an inference-only file
    scaler          `GradScaler.state_dict()` when fp16 loss scaling is on, else None
    epoch           int, 0-based index of the last completed epoch (a resumed run starts at epoch + 1)
    train_state     dict of plain values the trainer keeps across epochs (best fitness, best epoch, counters)
    rng             `capture_rng_state()`: torch CPU, CUDA, numpy and python `random` generator states
    train_config    dict, the resolved TrainConfig as plain values
    names           list[str], class names (index = contiguous class)
    category_ids    list[int], the dataset's category id for each class (predictions map back to them)
    imgsz           int, training image size
    run_dir         str, the run folder that wrote it

There is no scheduler state: the learning rate and momentum are a pure function of (epoch, iteration) and the
config (`detector.train.optim.LRSchedule`), so the epoch is all a resume needs.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn as nn

from detector.errors import DetectorError, write_failed

FORMAT_VERSION = 1
CHECKPOINT_SUFFIXES = (".pt", ".pth")  # what `model=` names a checkpoint by (anything else: a model YAML)
_SHOWN = 3  # how many keys of each kind a weights-mismatch message names before giving counts


class Checkpoint(TypedDict):
    format_version: int
    version: str
    model_yaml: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, Any] | None
    optimizer: dict[str, Any] | None
    scaler: dict[str, Any] | None
    epoch: int
    train_state: dict[str, Any]
    rng: dict[str, Any]
    train_config: dict[str, Any]
    names: list[str]
    category_ids: list[int]
    imgsz: int
    run_dir: str


CHECKPOINT_KEYS: frozenset[str] = frozenset(Checkpoint.__annotations__)
# exact types (subclasses such as numpy.float64 would be pickled as objects that weights_only refuses)
_PLAIN_TYPES = frozenset({bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size})
_DICT_TYPES = frozenset({dict, OrderedDict})


# --------------------------------------------------------------------------------------------------
# writing and reading


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, fsync, `os.replace`, fsync the folder.

    A crash or a kill at any moment leaves either the previous file or the new one, never half of one. Any
    OSError (disk full included) removes the temporary file, leaves the previous checkpoint untouched and
    raises DetectorError naming the path, the error and the size being written. A value that
    `weights_only=True` could not read back raises TypeError before anything is written.
    """
    path = Path(path)
    _publish(*_serialized(path, state), path)


class CheckpointWriter:
    """`save_checkpoint` with its second half in a background thread, for the trainer's checkpoints of each epoch.

    The states are serialized at once (so the caller may go on changing their tensors), into temporary files;
    making those durable and renaming them (fsync, `os.replace`, fsync the folder: about half of a nano model's
    0.24 s save on an ext4 disk, and no CPU) overlaps the next epoch. Saves run one at a time: each waits for the
    one before, and `wait` raises a background failure (a DetectorError naming the path, as `save_checkpoint`
    would). A kill before a rename leaves the previous file and a temporary one the next run removes."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, files: dict[Path, dict[str, Any]], *, links: dict[Path, Path] | None = None) -> None:
        """Serialize each state of `files` for its path now; in the background, rename them into place in that order,
        then make each key of `links` a `copy_checkpoint` of its value (a hard link)."""
        self.wait()
        written: list[tuple[Path, str, Path]] = []
        try:
            for path, state in files.items():
                written.append((*_serialized(Path(path), state), Path(path)))
        except BaseException:
            for tmp, _, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        self._thread = threading.Thread(target=self._publish_all, args=(written, links or {}), name="checkpoint writer")
        self._thread.start()

    def wait(self) -> None:
        """Return once the last save is on disk under its names; raise its error, if it had one (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _publish_all(self, written: list[tuple[Path, str, Path]], links: dict[Path, Path]) -> None:
        try:
            for tmp, context, path in written:
                _publish(tmp, context, path)
            for path, source in links.items():
                copy_checkpoint(source, path)
        except BaseException as err:  # handed to the thread that waits
            self._error = err
        finally:
            for tmp, _, _ in written:  # those a failure left unrenamed
                tmp.unlink(missing_ok=True)


def copy_checkpoint(source: Path, path: Path) -> None:
    """Make `path` hold what the checkpoint `source` holds, as atomically as `save_checkpoint` writes it, without
    serializing it again (the trainer's `save_period` copies of last.pt: a nano model's is 41 MiB).

    A hard link where the filesystem has them: no byte is written, and sharing the file is safe because every
    save replaces a name with a new file and none writes into an existing one. Elsewhere a copy."""
    source, path = Path(source), Path(path)
    tmp = _temp_for(path)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err, f"from {source}") from err
    _publish(tmp, f"from {source}", path)


def _serialized(path: Path, state: dict[str, Any]) -> tuple[Path, str]:
    """`state` written to a new temporary file beside `path` (not yet durable), and the size for error messages. Any
    failure removes the file; an OSError becomes a DetectorError naming `path`."""
    context = f"while writing about {_check_plain(state, 'checkpoint') / 2**20:.1f} MiB"
    tmp = _temp_for(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, err, context) from err
        raise
    return tmp, context


def _publish(tmp: Path, context: str, path: Path) -> None:
    """Make the written `tmp` durable and rename it to `path` (the rename made durable too); on any error `tmp` is
    removed, `path` is left as it was, and an OSError becomes a DetectorError naming `path`."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise _write_error(path, err, context) from err
    finally:
        tmp.unlink(missing_ok=True)


def _temp_for(path: Path) -> Path:
    """This process's temporary name for `path`, after removing those of writers that were killed."""
    _remove_stale_temps(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_error(path: Path, err: OSError, context: str) -> DetectorError:
    return DetectorError(f"{write_failed(path, err, 'checkpoint')} {context}; any previous {path.name} is left intact")


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint onto the CPU with `weights_only=True`; errors name the file.

    A pickle payload that the weights-only unpickler refuses (code, classes) is never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DetectorError(f"{path}: refused to load it (not a plain checkpoint; weights_only=True): {_refusal(err)}") from None
    except OSError as err:
        raise DetectorError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise DetectorError(f"{path}: not a readable checkpoint (truncated or corrupt?): {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(obj, dict) or "format_version" not in obj:
        raise DetectorError(f"{path}: not a detector checkpoint (no 'format_version'; a bare state_dict or another tool's file?)")
    if type(obj["format_version"]) is not int:
        raise DetectorError(f"{path}: not a detector checkpoint (format_version {obj['format_version']!r} is not an integer)")
    if obj["format_version"] > FORMAT_VERSION:
        raise DetectorError(f"{path}: checkpoint format {obj['format_version']} is newer than this detector reads ({FORMAT_VERSION}); upgrade detector")
    missing = sorted(CHECKPOINT_KEYS - obj.keys())
    if missing:
        raise DetectorError(f"{path}: checkpoint lacks keys {', '.join(missing)}")
    _check_metadata(obj, path)
    return obj  # type: ignore[return-value]


def _check_metadata(obj: dict[str, Any], path: Path) -> None:
    """The keys inference reads beside the weights, typed: a class name list and distinct integer category ids of
    one length, a positive image size (an edited or foreign file failed later with an IndexError in predict)."""
    names, ids, imgsz = obj["names"], obj["category_ids"], obj["imgsz"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise DetectorError(f"{path}: checkpoint 'names' must be a non-empty list of class names, got {names!r:.80}")
    if (not isinstance(ids, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in ids)
            or len(set(ids)) != len(ids)):
        raise DetectorError(f"{path}: checkpoint 'category_ids' must be distinct integers, got {ids!r:.80}")
    if len(ids) != len(names):
        raise DetectorError(f"{path}: checkpoint lists {len(names)} class names but {len(ids)} category ids")
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or not 0 < imgsz <= 8192:
        raise DetectorError(f"{path}: checkpoint 'imgsz' must be an image size in 1..8192, got {imgsz!r:.80}")


def _refusal(err: pickle.UnpicklingError) -> str:
    """The unpickler's own reason (e.g. 'Unsupported global: GLOBAL builtins.exec ...') without torch's advice text."""
    text = str(err)
    if "WeightsUnpickler error:" not in text:
        return _first_line(err)
    reason = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split(". Please use")[0]
    return " ".join(reason.split()).rstrip(".") or _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _check_plain(obj: Any, where: str) -> int:
    """Raise TypeError at the first value `weights_only` could not load; return the tensor bytes found."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if type(obj) in _DICT_TYPES:
        return sum(_check_plain(k, f"{where} key") + _check_plain(v, f"{where}.{k}") for k, v in obj.items())
    if type(obj) in (list, tuple):
        return sum(_check_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in _PLAIN_TYPES:
        return 0
    raise TypeError(f"{where}: {type(obj).__name__} is not a plain value; torch.load(weights_only=True) could not read it back")


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of writers that were killed mid-write (their process is gone) would fill the disk."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; Windows cannot open a folder for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# random generator states


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU, and CUDA when in use), numpy and python `random` states as tensors and plain values."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `capture_rng_state`; CUDA states are restored for the GPUs present (their count may differ)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))


# --------------------------------------------------------------------------------------------------
# weights into a model


def state_differences(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """How a state dict differs from a model's: (keys it lacks, keys the model lacks, keys of another shape)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, reshaped


def listed(items: list[str], most: int) -> str:
    """The first `most` items, comma-separated, with ', ...' when there are more."""
    return ", ".join(items[:most]) + (", ..." if len(items) > most else "")


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `model` exactly, or raise DetectorError saying how they differ.

    The message names the first few missing keys, unexpected keys and shape mismatches, with their counts,
    which is what a checkpoint of another model YAML or another class count produces.
    """
    own = model.state_dict()
    missing, unexpected, reshaped = state_differences(own, state_dict)
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in reshaped]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(items)} {label} ({listed(items, _SHOWN)})"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched))
            if items
        ]
        raise DetectorError(f"{source}: weights do not fit this model (another model YAML or class count?): {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def checkpoint_weights(ckpt: Checkpoint, *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights a checkpoint is used with: its EMA (what its metrics were measured on), or the raw ones when it
    kept no EMA or `use_ema` is off."""
    ema = ckpt["ema"]
    return ema["module"] if use_ema and ema is not None else ckpt["model"]


def inference_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` as an inference file: the weights it is used with (`checkpoint_weights`) as `model`, and no EMA,
    optimizer or scaler state. A finished run's best.pt is one: a quarter of a full AdamW checkpoint (the model, its
    EMA and two moments per weight), predicting, validating, exporting and fine-tuning exactly as the full file did."""
    return {**ckpt, "model": checkpoint_weights(ckpt), "ema": None, "optimizer": None, "scaler": None}


def model_from_checkpoint(ckpt: Checkpoint, *, use_ema: bool = True, source: str = "checkpoint") -> nn.Module:
    """Rebuild the architecture from `model_yaml` and load the EMA weights (or the raw ones); eval mode, on the CPU.

    Falls back to the raw weights when the checkpoint has no EMA. `source` (the file) names it in errors.
    """
    from detector.models.builder import build_model  # lazy: the model code is only needed here

    model = build_model(ckpt["model_yaml"])
    load_model_weights(model, checkpoint_weights(ckpt, use_ema=use_ema), source)
    return model.eval()
