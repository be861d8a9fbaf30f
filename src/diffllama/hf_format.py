"""The transformers checkpoint layout: safetensors weights, sharded or not, plus config.json and
generation_config.json; loading such a directory into a model class and saving a model into one.

A checkpoint directory holds either one ``model.safetensors`` or the shards ``model-00001-of-0000N.safetensors``
... with ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``),
each safetensors file carrying the metadata ``{"format": "pt"}``; ``config.json`` and tokenizer files lie beside
them. ``save_state_dict``/``load_state_dict`` move ``dict[str, Tensor]`` to and from such a directory;
``load_pretrained``/``save_pretrained`` apply them to a model (any class taking a ``DiffLlamaConfig``: this module
imports no model code). Hub repo ids are resolved to a directory by :mod:`diffllama.hub`.

Saving is atomic per file, not per checkpoint: every file is first written to a staging folder inside the
directory, and only once all are complete do they replace the old files, one rename each; a failed save leaves the
old checkpoint as it was, but a reader during the renames can pair new weights with the old config.json (see
``save_state_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffllama.config import ATTN_IMPLEMENTATIONS, DiffLlamaConfig, architecture_name
from diffllama.hub import resolve_checkpoint_dir
from diffllama.io import default_permissions, new_folder, read_json_object

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
STAGING_PREFIX = ".staging-"
GENERATION_CONFIG = "generation_config.json"

# Decimal and binary units, as in transformers' ``convert_file_size_to_int``.
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


# ----------------------------------------------------------------------------------------------------------------
# sizes


def parse_size(size: int | str) -> int:
    """Return a shard size in bytes, given as an int or a string such as ``"5GB"``, ``"500MB"`` or ``"2GiB"``.

    Units follow transformers: ``KB``/``MB``/``GB``/``TB`` are powers of 10, ``KiB``/``MiB``/``GiB``/``TiB``
    powers of 2, ``B`` or no unit means bytes; letters are case-insensitive, except that (as in transformers) a
    lowercase final ``b`` after a decimal prefix, as in ``"5Gb"``, means bits. Fractions (``"1.5GB"``) round
    down.

    Args:
        size: a positive number of bytes, or a string of a number and a unit.

    Returns:
        The size in bytes, a positive int.

    Raises:
        ValueError: naming ``max_shard_size``, for an unparsable string, an unknown unit, a bool or other type, or a
            size that is not positive.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        n_bytes = size
    else:
        match = _SIZE_RE.fullmatch(size)
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ValueError(
                f"max_shard_size {size!r} is not a size: use an int (bytes) or a number with a unit among "
                "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '5GB')"
            )
        n_bytes = int(float(match.group(1)) * _SIZE_UNITS[unit])
        if unit in ("KB", "MB", "GB", "TB") and match.group(2).endswith("b"):  # "5Gb": bits, as in transformers
            n_bytes //= 8
    if n_bytes <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n_bytes


# ----------------------------------------------------------------------------------------------------------------
# saving


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    extra_files: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` to ``directory`` as safetensors in transformers' layout, each file atomically.

    Layout (transformers' ``save_pretrained``): one ``model.safetensors`` when every tensor fits in
    ``max_shard_size``, else shards ``model-00001-of-0000N.safetensors`` ... filled in ``state_dict`` order (a
    tensor larger than ``max_shard_size`` gets a shard of its own) and ``model.safetensors.index.json`` holding
    ``{"metadata": {"total_size": <sum of tensor bytes>}, "weight_map": {name: shard file}}``. Every file carries
    the safetensors metadata ``{"format": "pt"}``. Tensors are detached and made contiguous; a tensor whose memory
    is already used by an earlier one (tied weights) is cloned, so both names are written.

    Atomicity, and where it ends: all files go first to a staging folder ``directory/.staging-XXXX``, and only when
    every one is complete are they moved in, one ``os.replace`` each, so no file is ever seen half written. An
    exception before the moves leaves ``directory`` as it was (a directory created by this call is removed again,
    with any parent folders it created) and no staging folder behind. The moves are not one atomic step: the old
    index is removed, the new weights moved in, then the new index, then weight files of the old checkpoint that
    the new one does not overwrite are removed, and ``extra_files`` (config.json, ...) are moved in last. So while
    they run a reader may find no loadable weights (old shards without their index), or the new weights beside the
    old ``extra_files``; a process killed during the moves leaves that state behind. No order of renames can avoid
    this, since a loader reads config.json and the weights at different moments: do not load from a directory
    while it is being saved to.

    Args:
        state_dict: parameter name -> tensor (any device; written as its CPU copy).
        directory: the checkpoint directory; created if missing.
        max_shard_size: the largest shard in bytes, an int or a string like ``"5GB"`` (see ``parse_size``).
        extra_files: file name -> text, written beside the weights (e.g. ``{"config.json": ...}``).

    Returns:
        The paths written: the weight files, then the index if sharded, then the extra files.

    Raises:
        ValueError: a bad ``max_shard_size``; a value that is not a tensor, or is on the meta device; an extra
            file name that is not a plain file name or that clashes with a weight file name.
        NotADirectoryError: ``directory``, or a folder above it, is a file.
    """
    shard_limit = parse_size(max_shard_size)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"extra_files name {name!r} must be a plain file name, without folders")
        if _is_weight_file(name):
            raise ValueError(f"extra_files name {name!r} clashes with a weight file written by save_state_dict")
    target = Path(directory)
    blocker = next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"cannot save a checkpoint to {str(target)!r}: {str(blocker)!r} is a file, not a "
                                 f"folder")
    tensors = _prepare_tensors(state_dict)
    shards = _plan_shards(tensors, shard_limit)

    staging = None
    try:
        with new_folder(directory) as directory:  # a failure removes the folders it created
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
            weight_names, index_text = _name_shards(shards, tensors)
            for file_name, names in zip(weight_names, shards):
                save_file({n: tensors[n] for n in names}, staging / file_name, metadata={"format": "pt"})
            if index_text is not None:
                (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(index_text)
            for name, text in extra_files.items():
                (staging / name).write_text(text)
            for path in staging.iterdir():  # safetensors writes its files 0o600
                default_permissions(path)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise

    # Every file is complete: swap them in.
    stale = [p for p in directory.iterdir() if p.is_file() and _is_weight_file(p.name)]
    (directory / SAFE_WEIGHTS_INDEX_NAME).unlink(missing_ok=True)
    order = list(weight_names) + ([SAFE_WEIGHTS_INDEX_NAME] if index_text is not None else [])
    written = []
    for name in order:
        os.replace(staging / name, directory / name)
        written.append(directory / name)
    for path in stale:
        if path.name not in order:
            path.unlink(missing_ok=True)
    for name in extra_files:
        os.replace(staging / name, directory / name)
        written.append(directory / name)
    shutil.rmtree(staging, ignore_errors=True)
    return written


def _is_weight_file(name: str) -> bool:
    return name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or SHARD_PATTERN.fullmatch(name) is not None


def _prepare_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors, each owning memory no other one in the dict overlaps (ties are cloned)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[torch.device, int]] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.is_meta:
            raise ValueError(f"state_dict[{name!r}] is on the meta device and has no data to save")
        tensor = tensor.detach().contiguous()
        if tensor.numel() > 0:
            key = (tensor.device, tensor.untyped_storage().data_ptr())
            if key in seen_storages:  # shares memory with an earlier tensor: safetensors refuses that
                tensor = tensor.clone()
                key = (tensor.device, tensor.untyped_storage().data_ptr())
            seen_storages.add(key)
        out[name] = tensor
    return out


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Split names into shards of at most ``limit`` bytes, in order; an oversize tensor is a shard alone."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, tensor in tensors.items():
        size = _nbytes(tensor)
        if shards[-1] and current + size > limit:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def _name_shards(shards: list[list[str]], tensors: dict[str, torch.Tensor]) -> tuple[list[str], str | None]:
    """The file name of each shard, and the index JSON text (None for a single file)."""
    if len(shards) == 1:
        return [SAFE_WEIGHTS_NAME], None
    file_names = [SHARD_NAME.format(index=i + 1, total=len(shards)) for i in range(len(shards))]
    weight_map = {name: file for file, names in zip(file_names, shards) for name in names}
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    return file_names, json.dumps(index, indent=2) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the weights of a checkpoint directory in transformers' safetensors layout, on CPU.

    With ``model.safetensors.index.json`` present, loads the tensors its ``weight_map`` lists from their shards
    (``model-0000i-of-0000N.safetensors``); otherwise loads every tensor of ``model.safetensors``. Tied weights
    that transformers leaves out of the files (e.g. ``lm_head.weight``) are not added here.

    Args:
        directory: the checkpoint directory.

    Returns:
        Parameter name -> CPU tensor, in the order of the files.

    Raises:
        FileNotFoundError: naming the directory and the expected files, when it does not exist or holds neither
            weight layout (noting a ``pytorch_model.bin``, since only safetensors is supported).
        ValueError: naming the file, for an index that is not valid JSON or lacks a ``weight_map``, a shard the
            index lists that is missing, a tensor the index lists that is not in its shard, or a safetensors file
            that is truncated or corrupt.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist or is not a directory")
    index_path = directory / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        return _load_sharded(index_path)
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return _load_safetensors(single)
    hint = ""
    if any((directory / name).exists() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        hint = (
            "; it holds a pytorch_model.bin checkpoint, but only safetensors is supported (convert it, e.g. "
            "load it with transformers and save_pretrained with safe_serialization)"
        )
    raise FileNotFoundError(
        f"no weights in checkpoint directory {str(directory)!r}: expected {SAFE_WEIGHTS_NAME} or "
        f"{SAFE_WEIGHTS_INDEX_NAME} with its shards{hint}"
    )


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path} is not valid JSON: {error}") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index_path} has no 'weight_map' object mapping tensor names to shard files")

    by_shard: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_shard.setdefault(file_name, []).append(name)
    state_dict: dict[str, torch.Tensor] = {}
    for file_name, names in by_shard.items():
        shard_path = index_path.parent / file_name
        if Path(file_name).name != file_name or not shard_path.is_file():
            raise ValueError(f"shard {file_name!r} listed in {index_path} is missing from {index_path.parent}")
        shard = _load_safetensors(shard_path)
        missing = [n for n in names if n not in shard]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(f"{shard_path} lacks tensors that {index_path.name} assigns to it: {shown}")
        for name in names:
            state_dict[name] = shard[name]
    return state_dict


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors_header(path)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid safetensors file: {error}") from error


def _check_safetensors_header(path: Path) -> None:
    """Raise ValueError naming ``path`` unless its header parses and its data offsets fit the file.

    safetensors format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte after the header), then data.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: {file_size} bytes, no header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: header of {header_len} bytes announced, "
                f"file has {file_size} bytes"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt: its safetensors header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data_size = file_size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{path} is corrupt: tensor {name!r} has bad data_offsets {offsets!r}")
        if offsets[1] > data_size:
            raise ValueError(
                f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data, which has only "
                f"{data_size} bytes"
            )


# ---- model-level loading and saving (transformers' DiffLlama layout) --------------------------------------------

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "half": torch.float16, "float64": torch.float64, "double": torch.float64}
BASE_PREFIXES = ("model.", "transformer.")
HEAD_PREFIXES = ("lm_head.", "score.", "qa_outputs.")


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float32", "bfloat16", "float16", "float64"); None -> default.

    Raises:
        ValueError: naming ``dtype`` and the accepted names.
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES))} (or a torch dtype of those), got {dtype!r}")
    return DTYPES[name]


def load_pretrained(cls, path_or_repo_id, *, dtype=None, device=None, attn_implementation=None, torch_dtype=None,
                    device_map=None, revision=None, local_files_only=False, low_cpu_mem_usage=None,
                    trust_remote_code=None, **config_overrides):
    """Build ``cls`` from a checkpoint directory or cached hub repo (see ``DiffLlamaPreTrainedModel.from_pretrained``).

    ``dtype``: a torch dtype or its name (see :func:`parse_dtype`), or None or ``"auto"`` (the default, as in
    transformers 5.17): the checkpoint's, i.e. the ``dtype``/``torch_dtype`` entry of config.json, else that of the
    first floating-point weight in the files, else float32. ``torch_dtype``: transformers' deprecated name for
    ``dtype`` (a FutureWarning). ``device``: a torch device or its name (default CPU). ``device_map``:
    transformers' alternative to ``device``, for one device only (see :func:`device_from_map`). ``revision`` and
    ``local_files_only``: for a hub repo id, as :func:`resolve_checkpoint_dir`.
    ``low_cpu_mem_usage`` and ``trust_remote_code``: accepted for transformers' call signature and ignored (the
    weights load straight from safetensors; there is no remote code to trust). ``config_overrides``: fields of
    ``DiffLlamaConfig`` (or ``num_labels``) replacing config.json's entries.

    Order of the checks: every argument (the names of ``config_overrides`` and the ``attn_implementation`` value
    included) is checked before ``path_or_repo_id`` is resolved, so before anything is downloaded or read;
    config.json (its ``dtype`` entry included) is parsed and checked before any weight file is read.

    Keys are matched to the class: the decoder may sit under ``model.`` or ``transformer.`` (or no prefix) in the
    file; weights of another task head (e.g. ``lm_head`` when loading into a classifier) are dropped and this
    class's missing head weights keep their fresh initialisation; both are listed in ``model.loading_report``.
    Where config.json and the weight files disagree (tied or untied head, extra, missing or misshapen keys,
    dtypes), see :func:`_load_into`: transformers' behaviour, or a ValueError naming the keys.

    Raises:
        FileNotFoundError, ValueError: see ``from_pretrained``; a ValueError lists missing/unexpected decoder keys
        and shape mismatches by name; one names ``dtype`` and ``torch_dtype`` when both are given, or ``device``
        and ``device_map``; one names the unknown ``config_overrides``, or ``attn_implementation`` and its
        accepted values.
        TypeError: ``local_files_only`` not a bool, ``revision`` not None or a str.
        NotImplementedError: a ``device_map`` spreading the model over several devices.
    """
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError(f"give dtype or torch_dtype (its deprecated name), not both: got dtype={dtype!r}, "
                             f"torch_dtype={torch_dtype!r}")
        warnings.warn("torch_dtype is deprecated (as in transformers): use dtype instead", FutureWarning,
                      stacklevel=3)  # past the model class's from_pretrained: its caller
        dtype = torch_dtype
    target_dtype = None
    if dtype is not None and not (isinstance(dtype, str) and dtype == "auto"):
        try:
            target_dtype = parse_dtype(dtype)
        except ValueError as error:
            raise ValueError(f"{error}; or 'auto' (the checkpoint's)") from None
    if device_map is not None:
        if device is not None:
            raise ValueError(f"give device or device_map, not both: got device={device!r}, device_map={device_map!r}")
        device = device_from_map(device_map)
    device = parse_device(device)
    if not isinstance(local_files_only, bool):
        raise TypeError(f"local_files_only must be a bool, got {local_files_only!r}")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be None or a str (a branch, tag or commit hash), got {revision!r}")
    # DiffLlamaConfig.from_dict makes the same two checks, but only once config.json is at hand, which for a hub
    # repo id means after a download.
    unknown = sorted(set(config_overrides) - config_override_names())
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}: keyword arguments must be DiffLlamaConfig fields "
                         f"(e.g. rope_theta, pad_token_id) or num_labels")
    if attn_implementation is not None:
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got "
                             f"{attn_implementation!r}")
        config_overrides["attn_implementation"] = attn_implementation
    directory = resolve_checkpoint_dir(path_or_repo_id, revision=revision, local_files_only=local_files_only)
    config = DiffLlamaConfig.from_pretrained(directory, **config_overrides)
    if target_dtype is None:
        target_dtype = _config_dtype(config)
    state = load_state_dict(directory)
    if target_dtype is None:  # transformers' "auto" without a config entry: the first floating weight's dtype
        target_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with torch.device(device):
        model = cls(config)
    model.to(dtype=target_dtype)
    report = _load_into(model, state, str(directory))
    model.loading_report = report
    model.generation_config = read_generation_config(directory)
    return model.eval()


class GenerationConfig(dict):
    """``generation_config.json``'s entries: a dict whose entries also read and write as attributes, as on
    transformers' ``GenerationConfig`` (an entry that is not set reads as None). transformers' Trainer
    (``align_special_tokens``, run when it is given a tokenizer) and PEFT use the attribute form."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends probe dunder names: not entries
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        """A plain dict copy, as transformers' ``GenerationConfig.to_dict``."""
        return dict(self)


def read_generation_config(directory: str | os.PathLike) -> GenerationConfig:
    """The ``generation_config.json`` of a checkpoint directory ({} when absent).

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    path = Path(directory) / GENERATION_CONFIG
    return GenerationConfig(read_json_object(path) if path.is_file() else {})


def config_override_names() -> set[str]:
    """The keyword arguments ``DiffLlamaConfig.from_dict`` accepts as overrides: the config's dataclass fields
    (``extra`` excepted: unknown keys of config.json land there, never keywords) and transformers' ``num_labels``."""
    return {f.name for f in dataclasses.fields(DiffLlamaConfig)} - {"extra"} | {"num_labels"}


def parse_device(device) -> torch.device:
    """A torch device from a device, its name (``"cpu"``, ``"cuda"``, ``"cuda:1"``) or None (the CPU).

    Raises:
        ValueError: naming ``device``: not a device, or a CUDA device on a machine without CUDA.
    """
    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available on this machine")
    return device


def device_from_map(device_map) -> torch.device:
    """The one device a transformers-style ``device_map`` names: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a
    ``torch.device``, a GPU index (int), ``{"": device}`` (the whole model on that device), or ``"auto"``: the first
    CUDA device when CUDA is available, else the CPU (where transformers' "auto" puts a model that fits).

    Raises:
        NotImplementedError: naming ``device_map``: a dict placing modules on several devices, or a multi-device
            strategy (``"balanced"``, ``"balanced_low_0"``, ``"sequential"``).
        ValueError: naming ``device_map``: anything else that is not a device.
    """
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, dict) or (isinstance(device_map, str)
                                        and device_map in ("balanced", "balanced_low_0", "sequential")):
        raise NotImplementedError(f"device_map={device_map!r} places the model over several devices, which is not "
                                  f"supported: give one device (e.g. 'cpu', 'cuda:0' or 'auto')")
    if isinstance(device_map, str) and device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0:
        return torch.device("cuda", device_map)  # explicit: torch.device(0) fails without CUDA, unexplained
    try:
        if isinstance(device_map, bool) or not isinstance(device_map, (str, torch.device)):
            raise TypeError
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device_map must be one device such as 'cpu', 'cuda', 'cuda:1', a GPU index, a "
                         f"torch.device or 'auto', got {device_map!r}") from error


def _config_dtype(config) -> torch.dtype | None:
    """transformers' ``dtype="auto"`` as far as config.json tells it: its ``dtype`` entry, else its ``torch_dtype``
    entry; None when neither is there (or it is ``"auto"``). Raises ValueError naming the entry for another name."""
    key = "dtype" if config.extra.get("dtype") is not None else "torch_dtype"
    named = config.extra.get(key)
    if named is None or named == "auto":  # "auto" in a file says no more than its absence
        return None
    try:
        return parse_dtype(named)
    except ValueError as error:
        raise ValueError(f"config.json's {key!r} entry: {error}") from None


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Copy ``state`` into ``model`` after prefix adaptation; returns {"new": [...], "dropped": [...]}.

    As transformers 5.17's loading: another task's head weights are dropped, this class's missing head weights
    keep their initialisation (a UserWarning names them), ``rotary_emb.inv_freq`` buffers of old checkpoints are
    dropped (derived from the config), a tied config meets the file's ``lm_head.weight`` as :func:`_resolve_tie`
    says; weights of another floating dtype are cast to the model's. Missing or unexpected decoder keys, shape
    mismatches and non-floating weights are refused (transformers would initialise or ignore them)."""
    prefix = model.base_model_prefix + "." if model.base_model_prefix else ""
    expected = model.state_dict()
    adapted = {}
    for key, tensor in state.items():
        if not key.startswith(HEAD_PREFIXES):
            key = prefix + next((key[len(p):] for p in BASE_PREFIXES if key.startswith(p)), key)
        adapted[key] = tensor
    # Old checkpoints hold RoPE's inv_freq, a buffer derived from the config (transformers ignores it too).
    derived = sorted(k for k in adapted if k.endswith("rotary_emb.inv_freq"))
    for key in derived:
        del adapted[key]
    if model.config.tie_word_embeddings and "lm_head.weight" in expected:
        _resolve_tie(model, adapted, prefix + "embed_tokens.weight", source)
        if model.config.tie_word_embeddings:  # still tied: the file's head, if any, equals the embedding
            adapted.pop("lm_head.weight", None)
            expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    dropped = sorted(k for k in adapted if k not in expected and k.startswith(HEAD_PREFIXES)) + derived
    unexpected = sorted(k for k in adapted if k not in expected and k not in dropped)
    missing = sorted(k for k in expected if k not in adapted)
    new = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    missing = [k for k in missing if k not in new]
    if missing or unexpected:
        raise ValueError(f"checkpoint {source} does not match {type(model).__name__}: "
                         f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    mismatched = [f"{key}: the config expects {tuple(expected[key].shape)}, the file has {tuple(tensor.shape)}"
                  for key, tensor in sorted(adapted.items())
                  if key in expected and tensor.shape != expected[key].shape]
    if mismatched:
        raise ValueError(f"checkpoint {source}: shape mismatch for {'; '.join(mismatched[:5])}"
                         f"{' ...' if len(mismatched) > 5 else ''}")
    integral = [f"{key} ({tensor.dtype})" for key, tensor in sorted(adapted.items())
                if key in expected and not tensor.is_floating_point()]
    if integral:  # every weight of this model is floating: casting ints or bools would load them as numbers
        raise ValueError(f"checkpoint {source}: weights must be floating point, got {', '.join(integral[:5])}"
                         f"{' ...' if len(integral) > 5 else ''}")
    model.load_state_dict({k: v for k, v in adapted.items() if k in expected}, strict=False)
    if new:
        warnings.warn(f"{type(model).__name__}: newly initialised weights not in the checkpoint: {new}", stacklevel=3)
    return {"new": new, "dropped": dropped}


def _resolve_tie(model: torch.nn.Module, adapted: dict[str, torch.Tensor], embed_key: str, source: str) -> None:
    """Reconcile ``config.tie_word_embeddings=True`` with the file's ``lm_head.weight``, as transformers 5.17's
    ``tie_weights`` does on loading: a head equal to the embedding (in the model's dtype) is the tie itself; a
    head without an embedding in the file gives the embedding its values; a head that differs is kept, untied, with
    a UserWarning, and ``model.config.tie_word_embeddings`` becomes False so that ``tie_weights`` and
    ``save_pretrained`` keep it (transformers leaves its config saying True). Edits ``adapted`` and ``model``."""
    head = adapted.get("lm_head.weight")
    if head is None:
        return
    embed = adapted.get(embed_key)
    if embed is None:
        adapted[embed_key] = head
        return
    dtype = model.lm_head.weight.dtype
    if head.shape == embed.shape and torch.equal(head.to(dtype), embed.to(dtype)):
        return
    warnings.warn(f"checkpoint {source}: config.json sets tie_word_embeddings=true but the weight files hold an "
                  f"lm_head.weight that differs from {embed_key}: the file's head is kept and not tied, as "
                  f"transformers does (model.config.tie_word_embeddings is now False; set it so in config.json "
                  f"to silence this warning)", UserWarning, stacklevel=5)  # from_pretrained's caller
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))


def save_pretrained(model: torch.nn.Module, directory, *, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write ``model`` as transformers does: config.json (with ``architectures`` and ``dtype``) + safetensors, and
    for a causal LM ``generation_config.json`` (see :func:`generation_config_for`).

    The tied ``lm_head.weight`` is omitted. Written by :func:`save_state_dict`, the side files as its
    ``extra_files``: each file atomically, a failure before the files are moved in leaves the directory as it was,
    and while they are moved in a reader may see the new weights with the old config.json. A leading ``~`` in
    ``directory`` is the home folder, as for loading. Returns the written paths.

    Raises:
        ValueError: for a bad ``max_shard_size`` (before anything is written: see :func:`save_state_dict`).
    """
    state, files = pretrained_files(model, model.state_dict())
    directory = Path(directory).expanduser()  # "~/models/x" as from_pretrained reads it, not a folder named "~"
    return save_state_dict(state, directory, max_shard_size=max_shard_size, extra_files=files)


def pretrained_files(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """What :func:`save_pretrained` writes for ``model`` whose weights are ``state`` (its full state dict, e.g.
    gathered from FSDP shards): the state without a tied ``lm_head.weight``, and the side files by name
    (config.json with ``architectures``, transformers' class name for a llama (:func:`architecture_name`), and the
    weights' ``dtype``; ``generation_config.json`` for a causal LM)."""
    state = dict(state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config["architectures"] = [architecture_name(type(model).__name__, model.config.model_type)]
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    files = {"config.json": _json_text(config)}
    # transformers writes one for models that can generate (its can_generate: the causal LM); duck-typed so that
    # this module needs no model code
    if callable(getattr(model, "generate", None)):
        files[GENERATION_CONFIG] = _json_text(generation_config_for(model))
    return state, files


def generation_config_for(model) -> dict:
    """The ``generation_config.json`` content :func:`save_pretrained` writes for a causal LM.

    ``model.generation_config`` when it holds anything (as loaded from a checkpoint's file: kept as it was, as
    transformers keeps a loaded generation config); else what transformers 5.17 writes for a freshly built model:
    the config's ``bos_token_id``/``eos_token_id``/``pad_token_id`` (those not None), ``use_cache``, the
    ``output_attentions``/``output_hidden_states`` flags (False) and ``_from_model_config``: True. Not
    ``transformers_version``, which this library does not claim (config.json does not either). Returns a new dict.
    """
    loaded = getattr(model, "generation_config", None)
    if isinstance(loaded, dict) and loaded:
        return dict(loaded)
    config = model.config
    ids = {name: getattr(config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(config, name) is not None}
    return {"_from_model_config": True, **ids, "output_attentions": False, "output_hidden_states": False,
            "use_cache": config.use_cache}


def _json_text(data: dict) -> str:
    """JSON as transformers writes its config files: indented by 2, keys sorted, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
