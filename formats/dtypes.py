"""Tensor element types under their safetensors codes: the one table every reader and writer uses.

No torch here: the torch side maps a code to ``getattr(torch, NAMES[code])``.
"""
from __future__ import annotations

# code: (torch's name of the dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "F64": ("float64", 8), "I64": ("int64", 8), "U64": ("uint64", 8),
}
ITEMSIZE: dict[str, int] = {code: size for code, (_, size) in DTYPES.items()}
NAMES: dict[str, str] = {code: name for code, (name, _) in DTYPES.items()}
CODE_OF_NAME: dict[str, str] = {name: code for code, name in NAMES.items()}
# The floating dtypes users name on the command line (--dtype) and in config.json.
FLOAT_NAMES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def nbytes(code: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[code]
    for d in shape:
        n *= d
    return n


def cast(data, src: str, dst: str):
    """Raw bytes of dtype ``src`` as dtype ``dst``, rounded as torch rounds (``Tensor.to``).

    The one tensor computation below the converter (``verify --source`` of a conversion made with
    ``--dtype`` needs it): torch is imported here, when a cast is asked for, and nowhere else in formats.
    """
    import ctypes

    import torch

    if not memoryview(data).nbytes:
        return b""
    buf = data if isinstance(data, bytearray) else bytearray(data)  # frombuffer warns on read-only memory
    y = torch.frombuffer(buf, dtype=getattr(torch, NAMES[src])).to(getattr(torch, NAMES[dst])).contiguous()
    return ctypes.string_at(y.data_ptr(), y.numel() * y.element_size())
