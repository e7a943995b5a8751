"""Weights from safetensors files (never pickle), checked against the model before they are loaded:
a checkpoint's UNet, a diffusers SVD UNet or TAESD directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mvd_deploy.errors import MvdError

_MAP_WINDOW = 256 * 2**20
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes from a safetensors file, reading no tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            infos = {}
            for key in f.keys():
                sl = f.get_slice(key)
                infos[key] = TensorInfo(tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
            return infos
    except FileNotFoundError:
        raise MvdError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError) as e:
        raise MvdError(f"{path}: not a readable safetensors file, truncated or corrupt ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def check_weights(path: Path, header: dict[str, TensorInfo], model: torch.nn.Module, dtype: str) -> None:
    """Keys, shapes and dtypes of ``header`` against ``model``'s state dict; first mismatch raises."""
    expected = model.state_dict()
    for key in expected:
        if key not in header:
            raise MvdError(f"{path}: key '{key}' is missing")
    for key, info in header.items():
        if key not in expected:
            raise MvdError(f"{path}: key '{key}' is unexpected (not a parameter of this model)")
        want = tuple(expected[key].shape)
        if info.shape != want:
            raise MvdError(f"{path}: key '{key}' has shape {list(info.shape)}, expected {list(want)}")
        if info.dtype != dtype:
            raise MvdError(f"{path}: key '{key}' has dtype {info.dtype}, expected {dtype}")


def load_weights(path: Path, model: torch.nn.Module, dtype: str) -> None:
    """Check, then load ``path`` into ``model`` (which may live on the meta device)."""
    header = read_safetensors_header(path)
    check_weights(path, header, model, dtype)
    keys, state = list(header), {}
    try:
        # safetensors maps the file; pages read through the map count as ours until it closes, so
        # reopen every _MAP_WINDOW bytes: peak memory stays near the weights' size, not twice it.
        while len(state) < len(keys):
            with safe_open(str(path), framework="pt") as f:
                window = 0
                while len(state) < len(keys) and window < _MAP_WINDOW:
                    key = keys[len(state)]
                    # clone(): safetensors' buffers are not 64-byte aligned, and CPU kernels take other
                    # (slower, differently rounded) paths on unaligned data; torch's allocator aligns.
                    state[key] = f.get_tensor(key).clone()
                    window += state[key].nbytes
    except (SafetensorError, OSError) as e:
        raise MvdError(f"{path}: cannot read weights ({_one_line(e)})") from None
    model.load_state_dict(state, strict=True, assign=True)


def load_diffusers_weights(directory: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load a diffusers model directory's safetensors weights (fp32, or the fp16 variant) as float32."""
    candidates = [directory / f"diffusion_pytorch_model{v}.safetensors" for v in ("", ".fp16")]
    weights = next((p for p in candidates if p.exists()), None)
    if weights is None:
        raise MvdError(
            f"{directory}: no diffusion_pytorch_model[.fp16].safetensors (only safetensors weights are read)"
        )
    header = read_safetensors_header(weights)
    dtype = next(iter(header.values())).dtype if header else "float32"
    load_weights(weights, model, dtype)
    return model.float()


def load_weight_subset(path: Path, model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    """Load the keys of ``path`` that start with ``prefixes`` into ``model`` (the rest of the file,
    e.g. a VAE's decoder, is not read), checked like ``load_weights``."""
    header = {k: v for k, v in read_safetensors_header(path).items() if k.startswith(prefixes)}
    dtype = next(iter(header.values())).dtype if header else "float32"
    check_weights(path, header, model, dtype)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {key: f.get_tensor(key).clone() for key in header}
    except (SafetensorError, OSError) as e:
        raise MvdError(f"{path}: cannot read weights ({_one_line(e)})") from None
    model.load_state_dict(state, strict=True, assign=True)
