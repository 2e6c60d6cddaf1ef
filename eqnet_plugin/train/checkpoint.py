"""Training checkpoints: one atomic file with the model, optimizer, scheduler, sampling generator and global RNG
states, the ElasticSpace and the active subnet, verified on reading by the zip CRCs and a sha256 over its content."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import zipfile
from typing import Mapping

import numpy as np
import torch

from . import distributed as D
from ..files import atomic_write_bytes
from ..quant.space import ElasticSpace, SubnetConfig
from ..supernet import Supernet
from .optim import SubnetOptimizer

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "CheckpointError", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "eqnet_plugin.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, not written by `save_checkpoint`, or belongs to another model."""


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_plain(value, where: str = "extra") -> None:
    """Raise TypeError unless `value` is made of plain Python values and tensors (what weights_only loads)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints store plain values (dict, list, str, "
                    "numbers, tensors) so they load with torch.load(weights_only=True): convert it first, e.g. "
                    "SubnetConfig.to_dict()")


def _hash_into(h, obj) -> None:
    """Feed `obj` (what `save_checkpoint` stores: plain values and tensors, nested in dicts, lists and tuples) into
    the hash `h` in a canonical form that a save/load round trip (also to another device) leaves unchanged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.is_quantized:
            t = t.int_repr()
        t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())        # the buffer itself, no copy
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _hash_into(h, k)
            _hash_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _hash_into(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(f"{obj!r};".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)};".encode() + b)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"B{len(obj)};".encode() + bytes(obj))
    else:
        h.update(f"O{type(obj).__name__}:{obj!r};".encode())


def _content_sha256(ckpt: Mapping) -> str:
    """sha256 (hex) over every entry of a checkpoint dict except its stored ``"sha256"``."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in ckpt.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, supernet: Supernet, optimizer: torch.optim.Optimizer | None,
                    scheduler=None, step: int = 0, generator: torch.Generator | None = None,
                    extra: Mapping | None = None) -> bool:
    """Write a training checkpoint atomically (temporary file in the same folder, then `os.replace`).

    Holds the model state_dict, optimizer, scheduler, step, the sampling generator's state, the torch / CUDA /
    numpy / Python RNG states, the ElasticSpace, the active subnet, a format version and ``"sha256"``: a hash of all
    the other entries, which `read_checkpoint` verifies (a flipped bit anywhere in the stored state is reported,
    never loaded). `extra` is stored as given (plain Python values and tensors, loadable with
    ``torch.load(weights_only=True)``). Under torch.distributed only rank 0 writes. Returns True when this process
    wrote the file.

    Raises:
        TypeError: `extra` holds an object that is not a plain value (nothing is written).
    """
    if not D.is_main_process():
        return False
    _check_plain(dict(extra) if extra is not None else {})
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": supernet.model.state_dict(),
        "space": supernet.space.to_dict(),
        "active_config": supernet.current_config().to_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "generator": generator.get_state() if generator is not None else None,
        "rng": _rng_state(),
        "extra": dict(extra) if extra is not None else {},
    }
    ckpt["sha256"] = _content_sha256(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return True


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), without torch's advice
    to load with weights_only=False (which would run arbitrary code from the file)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if "weights_only" in text or "weights-only" in text.lower() or not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


_ZIP_MAGIC = b"PK\x03\x04"
_CORRUPT_ADVICE = ("use an earlier checkpoint or train again (save_checkpoint writes atomically, so a crash while "
                   "saving leaves the previous file intact)")


def read_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """The raw checkpoint dict written by `save_checkpoint`, validated; restores nothing.

    Checks, in order: the file is a PyTorch zip archive, every entry passes its zip CRC check, it loads with
    ``torch.load(weights_only=True)``, it has our format and version, and its content matches the ``"sha256"``
    stored when it was written.

    Raises:
        FileNotFoundError: no file. CheckpointError: empty, truncated, corrupt or foreign file (the message names
        the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path!r} is a folder; give the checkpoint file in it (e.g. "
                                  f"{os.path.join(path, 'supernet.pt')!r})")
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): it was never written completely; "
                              + _CORRUPT_ADVICE)
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == _ZIP_MAGIC:
            raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt (its zip directory is missing or "
                                  "damaged: the file was cut off or damaged after writing); " + _CORRUPT_ADVICE)
        raise CheckpointError(f"{path!r} is not an eqnet_plugin checkpoint (not a PyTorch zip archive); write "
                              "checkpoints with `eqnet train` or eqnet_plugin.train.save_checkpoint")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:       # BadZipFile, zlib.error, EOFError, OSError, ...: a damaged archive
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt ({_first_line(e)}); "
                              + _CORRUPT_ADVICE) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its entry {bad!r} fails the zip CRC check (the file "
                              "was damaged after writing); " + _CORRUPT_ADVICE)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:     # weights_only refused an object: not something save_checkpoint writes
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it holds a {found.group(1)} object)" if found else ""
        raise CheckpointError(f"{path!r} is not an eqnet_plugin checkpoint and cannot be loaded safely{what}; write "
                              "checkpoints with `eqnet train` or eqnet_plugin.train.save_checkpoint") from None
    except Exception as e:      # RuntimeError, EOFError, KeyError, ...: damaged pickle or records
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt ({_first_line(e)}); "
                              + _CORRUPT_ADVICE) from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path!r} is not an eqnet_plugin checkpoint (found {keys}); write one with "
                              "eqnet_plugin.train.save_checkpoint, or load a plain state_dict with "
                              "supernet.model.load_state_dict(torch.load(path))")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {ckpt.get('version')!r}; this eqnet_plugin reads "
                              f"version {CHECKPOINT_VERSION}")
    stored = ckpt.get("sha256")
    if not isinstance(stored, str):
        raise CheckpointError(f"checkpoint {path!r} holds no content hash (\"sha256\"): it was not written by "
                              "save_checkpoint, or was re-saved without it, so its content cannot be verified; write "
                              "it again with eqnet_plugin.train.save_checkpoint")
    if stored != _content_sha256(ckpt):
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its content does not match the sha256 stored when "
                              "it was written (it was changed after saving); " + _CORRUPT_ADVICE)
    return ckpt


def load_checkpoint(path: str | os.PathLike, supernet: Supernet, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, generator: torch.Generator | None = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint written by `save_checkpoint` into `supernet` (and optimizer, scheduler, generator).

    Args:
        restore_rng: also restore the global torch / CUDA / numpy / Python RNG states (exact resume).
    The file is read on the CPU; `load_state_dict` copies the tensors to the model's and optimizer's devices.
    Returns:
        {"step", "extra", "space" (ElasticSpace), "active_config" (SubnetConfig), "rng"}.
    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: the file is truncated/corrupt, not ours, or holds another model's (or space's) state.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path, "cpu")
    space = ElasticSpace.from_dict(ckpt["space"])
    if space != supernet.space:
        raise CheckpointError(f"{path!r} was trained with space {space} but this supernet uses {supernet.space}; "
                              "build the Supernet with the checkpoint's space (ElasticSpace.from_dict)")
    state = ckpt["model"]
    own = supernet.model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path!r} holds another model's state: missing keys {missing[:5]}, unexpected keys "
                              f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all); rebuild the same "
                              "model and prepare it the same way (elastic_qconfig_mapping, backend_config)")
    try:
        supernet.model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path!r} does not fit this model: {str(e).splitlines()[-1].strip()[:300]}") from None
    supernet.mark_bn_trained()             # trained BN statistics: other subnets need their own (recalibrate_bn)
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise CheckpointError(f"{path!r} holds no optimizer state; load it with optimizer=None")
        saved = ckpt["optimizer"]
        if isinstance(saved, dict) and "subnets" in saved and not isinstance(optimizer, SubnetOptimizer):
            raise CheckpointError(f"{path!r} holds one optimizer state per sandwich subnet (SubnetOptimizer); "
                                  "resume it with eqnet_plugin.SubnetOptimizer(supernet.model.parameters(), "
                                  "torch.optim.Adam, lr=...), or pass optimizer=None to load the weights only")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path!r}: optimizer state does not match this optimizer ({e}); build the "
                                  "optimizer over supernet.model.parameters() in the same order as when saving"
                                  ) from None
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if generator is not None and ckpt["generator"] is not None:
        generator.set_state(ckpt["generator"])
    if restore_rng:
        _set_rng_state(ckpt["rng"])
    return {"step": ckpt["step"], "extra": ckpt["extra"], "space": space, "rng": ckpt["rng"],
            "active_config": SubnetConfig.from_dict(ckpt["active_config"])}
