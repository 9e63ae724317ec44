"""Shared training utilities: errors, JSON/atomic files, checkpoints, RNG state, stop flag."""
from __future__ import annotations

import json
import os
import random
import signal
import tempfile
import threading
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from torch import nn

from ..models import AddUNet, build_model

CHECKPOINT_FORMAT = "fusedskip-train-v1"
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input found after argument parsing: reported as ``prog: error: message``, exit 2."""


class Interrupted(Exception):
    """Training stopped by a signal (or the test hook) after saving a mid-epoch checkpoint."""




def jsonable(value):
    """Plain JSON-able copy (tuples → lists, tensors → lists, numpy scalars → Python)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_write_bytes(path: str, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder, fsync, then ``os.replace``: a reader (or a
    crash) never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(obj: Dict[str, Any], path: str) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: str) -> None:
    data = json.dumps(jsonable(obj), indent=2, allow_nan=True).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed and check a file can be written there (UsageError otherwise)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {path!r}: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise UsageError(f"output path {path!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output directory {path!r} is not writable: {exc.strerror or exc}") from None
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a fusedskip checkpoint with ``weights_only=True`` (UsageError with a clear reason)."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise UsageError(f"no checkpoint (best.pt or last.pt) in directory {path!r}")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read checkpoint {path!r}: {first[:300]}") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise UsageError(f"{path!r} is not a fusedskip training checkpoint (no model_config/model entries)")
    ckpt["_path"] = path
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, Any]) -> AddUNet:
    try:
        model = build_model(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {ckpt.get('_path', '')!r} describes a model this version cannot build: "
                         f"{exc}") from None
    load_weights(model, ckpt["model"], ckpt.get("_path", "checkpoint"))
    return model


def load_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error for another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise UsageError(f"{source} holds weights of another architecture: {', '.join(parts)}")
    model.load_state_dict(state)


def config_differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if jsonable(a.get(k)) != jsonable(b.get(k))]


# ----------------------------------------------------------------------------------------------


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))



class StopFlag:
    """Set by SIGINT/SIGTERM; checked at step boundaries (a second SIGINT aborts at once)."""

    def __init__(self):
        self.requested = False
        self._previous: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _version() -> str:
    try:
        import fusedskip

        return fusedskip.__version__
    except Exception:  # pragma: no cover
        return "unknown"

