"""``torch.Tensor`` and ``jax.Array`` leaves <-> numpy arrays plus a few facts (pure).

Neither framework is a dependency of castore.  A value can only be a tensor of a framework
the program has imported, so encoding looks in ``sys.modules`` and never imports one;
decoding a stored tensor imports its framework and says what to install if it is missing.

A tensor is stored as an ordinary array leaf (so exports, verify and dedup treat it like
any array) inside a ``torch`` / ``jax`` typed node whose attrs say how to rebuild it:

* ``torch``: ``dtype`` (torch's name: ``"bfloat16"``), ``device`` (``"cuda:0"``),
  ``requires_grad``, ``parameter`` (an ``nn.Parameter``), and ``tied``: the leaf path of
  an earlier tensor of the same component with the same storage, offset, shape and
  strides, which a load turns into the same object again.
* ``jax``: nothing yet; the array is restored on the default device, or with the
  sharding of a restore target.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

from ..errors import CorruptDataError, UnsupportedValueError, UsageError
from . import mldtypes

#: torch dtypes numpy holds as they are
_TORCH_NATIVE = frozenset(
    "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 float32 float64 complex64 complex128".split()
)
#: torch dtypes stored under their ml_dtypes name (the same name), bytes viewed through an
#: int (and stored as that unsigned int where ml_dtypes is missing): name -> item size
_TORCH_ML = {"bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1}
_INT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def torch_module():
    """The ``torch`` module if this program imported it (a tensor can exist only then)."""
    return sys.modules.get("torch")


def jax_module():
    return sys.modules.get("jax")


def _import(name: str, path: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(
            f"leaf {path!r} is a {name} array: install {name} to load it (pip install castore[{name}])"
        ) from None


# --- torch ---------------------------------------------------------------------------------------


def torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_to_numpy(tensor, path: str) -> tuple[np.ndarray, dict]:
    """A host numpy view (a copy only for a tensor on another device) and the attrs."""
    torch = torch_module()
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedValueError(
            path, f"tensor subclass {type(tensor).__qualname__} is not stored; pass a plain tensor"
        )
    # checked before anything reads the tensor's sizes or storage, which these lack
    if tensor.is_nested:
        raise UnsupportedValueError(path, "nested tensors are not stored; store their components (unbind())")
    if tensor.layout is not torch.strided:
        raise UnsupportedValueError(path, f"{tensor.layout} tensors are not stored; convert with to_dense()")
    if tensor.is_quantized:
        raise UnsupportedValueError(path, "quantized tensors are not stored; store dequantize() (and the qparams)")
    name = torch_dtype_name(tensor.dtype)
    if name not in _TORCH_NATIVE and name not in _TORCH_ML:
        raise UnsupportedValueError(path, f"torch dtype {name} has no stored form")
    device = str(tensor.device)
    if tensor.device.type == "meta":
        raise UnsupportedValueError(path, "a tensor on the meta device has no data to store")
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()  # the one copy a save of a device tensor needs
    data = data.resolve_conj().resolve_neg()
    if name in _TORCH_NATIVE:
        array = data.numpy()
    else:
        size = data.element_size()
        array = data.view(getattr(torch, f"int{8 * size}") if size > 1 else torch.uint8).numpy()
        array = array.view(_INT_OF_SIZE[size])
        if (ml_dtypes := mldtypes.module()) is not None:
            array = array.view(np.dtype(getattr(ml_dtypes, name)))
    attrs = {"dtype": name, "device": device, "requires_grad": bool(tensor.requires_grad)}
    if type(tensor) is torch.nn.Parameter:
        attrs["parameter"] = True
    return array, attrs


def torch_identity(tensor) -> tuple | None:
    """What makes two tensors the same data: tied weights share all of it.  None for a
    tensor without bytes: every empty tensor has storage address 0, and is tied to none."""
    if tensor.numel() == 0 or tensor.untyped_storage().data_ptr() == 0:
        return None
    return (
        tensor.untyped_storage().data_ptr(),
        str(tensor.device),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        tensor.is_conj(),  # x.conj() and x._neg_view() share x's memory but are other values
        tensor.is_neg(),
    )


def torch_dtype_of(attrs, path: str):
    torch = _import("torch", path)
    name = attrs.get("dtype")
    if name not in _TORCH_NATIVE and name not in _TORCH_ML:
        raise CorruptDataError(f"at {path!r}: unknown torch dtype {str(name)[:40]!r}")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"leaf {path!r} is torch {name}, which this torch lacks: upgrade torch")
    return torch, dtype


def check_torch_array(attrs, stored: np.dtype, path: str) -> None:
    """Refuse a stored array whose dtype is not the one a save writes for the tensor's
    dtype (``attrs["dtype"]``, already checked to be known): the bytes would be misread."""
    name = attrs.get("dtype")
    if name in _TORCH_NATIVE:
        ok = stored == np.dtype(name)
    else:
        size = _TORCH_ML[name]
        ok = stored == np.dtype(_INT_OF_SIZE[size])
        ml_dtypes = mldtypes.module()
        ok = ok or (ml_dtypes is not None and stored == np.dtype(getattr(ml_dtypes, name)))
    if not ok:
        raise CorruptDataError(f"at {path!r}: stored array {stored} is not torch {name}")


def torch_host_view(tensor, dtype) -> np.ndarray | None:
    """A writable numpy view of a CPU tensor's bytes, as a restore target, or None."""
    torch = torch_module()
    if torch is None or not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
        return None
    if tensor.dtype != dtype or not tensor.is_contiguous() or tensor.layout is not torch.strided:
        return None
    data = tensor.detach()
    if data.is_conj() or data.is_neg() or data.untyped_storage().data_ptr() == 0 and data.numel():
        return None
    size = data.element_size()
    if torch_dtype_name(dtype) in _TORCH_NATIVE:
        return data.numpy()
    return data.view(getattr(torch, f"int{8 * size}") if size > 1 else torch.uint8).numpy()


def torch_from_numpy(array: np.ndarray, attrs, path: str, map_location):
    """The tensor of a stored leaf: shares ``array``'s memory on the CPU."""
    torch, dtype = torch_dtype_of(attrs, path)
    if torch_dtype_name(dtype) in _TORCH_NATIVE:
        tensor = torch.from_numpy(array)
    else:
        size = array.dtype.itemsize
        ints = array.view(getattr(np, f"int{8 * size}") if size > 1 else np.uint8)
        tensor = torch.from_numpy(ints).view(dtype)
    if tensor.dtype != dtype:
        raise CorruptDataError(f"at {path!r}: stored array {array.dtype} is not torch {torch_dtype_name(dtype)}")
    device = torch_device(attrs, path, map_location)
    if callable(device):
        placed = device(tensor, str(attrs.get("device", "cpu")))
        if placed is None:  # as torch.load: None from the function means "where it was saved"
            placed = _place(tensor, torch_device(attrs, path, None))
        elif not isinstance(placed, torch.Tensor):
            raise UsageError(f"leaf {path!r}: map_location returned a {type(placed).__name__}, not a tensor")
        tensor = placed
    else:
        tensor = _place(tensor, device)
    return finish_tensor(tensor, attrs)


def _place(tensor, device):
    return tensor if str(device) == "cpu" else tensor.to(device)


def finish_tensor(tensor, attrs):
    torch = torch_module()
    # only floating and complex tensors can require grad (a damaged store may say otherwise)
    wants_grad = attrs.get("requires_grad") is True and (tensor.is_floating_point() or tensor.is_complex())
    if attrs.get("parameter") is True:
        return torch.nn.Parameter(tensor, requires_grad=wants_grad)
    if wants_grad:
        tensor.requires_grad_(True)
    return tensor


def torch_device(attrs, path: str, map_location):
    """Where a tensor saved on ``attrs["device"]`` goes: ``map_location`` as in
    ``torch.load`` (a device, a ``{saved: wanted}`` dict, or ``fn(tensor, saved)``), else
    its own device, if this machine has it."""
    torch = torch_module()
    saved = attrs.get("device", "cpu")
    if not isinstance(saved, str):
        raise CorruptDataError(f"at {path!r}: tensor device is not a string")
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        return map_location
    wanted = saved
    if isinstance(map_location, dict):
        wanted = map_location.get(saved, saved)
    elif map_location is not None:
        wanted = map_location
    try:
        device = torch.device(wanted)
    except (RuntimeError, TypeError, ValueError):
        raise CorruptDataError(f"at {path!r}: tensor device {str(wanted)[:40]!r} is not a torch device") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"leaf {path!r}: tensors are not restored to device {device}")
    if not _has_device(torch, device):
        raise UsageError(
            f"leaf {path!r} was saved on {saved}, which this machine lacks: load with map_location='cpu' "
            "(or another device)"
        )
    return device


def _has_device(torch, device) -> bool:
    """Whether this machine has ``device`` (cuda, mps and xpu alike, by index too)."""
    if device.type == "cpu":
        return True
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        return False
    count = getattr(backend, "device_count", None)
    return device.index is None or not callable(count) or device.index < count()


# --- jax -----------------------------------------------------------------------------------------


def jax_to_numpy(array, path: str) -> np.ndarray:
    """A host numpy copy (a view on the CPU) of a fully addressable ``jax.Array``."""
    if array.is_deleted():  # donated to a jitted call, or deleted
        raise UnsupportedValueError(path, "the jax.Array was deleted or donated: save the value the call returned")
    if not array.is_fully_addressable:
        raise UnsupportedValueError(
            path, "a jax.Array sharded across processes is not stored: each process holds only part of it"
        )
    try:
        host = np.asarray(array)
    except (TypeError, ValueError) as exc:  # typed PRNG keys and other extended dtypes
        raise UnsupportedValueError(
            path, f"jax dtype {array.dtype} has no numpy form ({exc}); store jax.random.key_data(key)"
        ) from None
    except RuntimeError as exc:  # an array jax cannot read back (a failed computation's result)
        raise UnsupportedValueError(path, f"jax cannot read this array back: {exc}") from None
    return host


def jax_target_sharding(into, shape: tuple, dtype: np.dtype):
    """The sharding of a restore target ``into`` of this shape and dtype, or None."""
    jax = jax_module()
    if jax is None or not isinstance(into, jax.Array) or tuple(into.shape) != shape or into.dtype != dtype:
        return None
    return into.sharding


def jax_from_numpy(array: np.ndarray, path: str, sharding=None):
    # a save writes only numeric arrays in native byte order: jax refuses anything else
    if array.dtype.kind not in "biufcV" or not array.dtype.isnative:
        raise CorruptDataError(f"at {path!r}: a jax array of dtype {array.dtype} is not one a save writes")
    jax = _import("jax", path)
    if jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype:  # jax would cast it, silently
        raise UsageError(
            f"leaf {path!r} is a jax {array.dtype} array, which this jax holds only with 64-bit types "
            "enabled: jax.config.update('jax_enable_x64', True) before loading"
        )
    try:
        return jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    except TypeError as exc:  # an ml_dtypes type this jax lacks
        raise UsageError(f"leaf {path!r}: this jax cannot hold {array.dtype} arrays ({exc}): upgrade jax") from None
