"""Reading the official CIFAR pickles (Python 2) without running what they name: a pickle can run any code, so
only dicts, lists, strings, numbers and checked numpy arrays of plain numeric dtypes are built. Anything else is
refused, as is a file that would crash, stall or exhaust the unpickler. Failures are DatasetErrors naming the file.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import reprlib
import stat
from pathlib import Path

import numpy as np

from cifar100.config import DatasetError

# The array dtypes a file may hold (official files: uint8 pixels, lists of ints).
DTYPE_CODES = ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")
MAX_TUPLE_NESTING = 100  # hashing a tuple nested ~100,000 deep as a dict key overflows the C stack
MAX_ENTRIES = 1_000  # dict and set entries per file (official: 5); crafted hash collisions cost n**2
MAX_INT_BITS = 256  # official files hold small ints; a huge one is slow to hash, compare and print
MAX_FILE_BYTES = 512 << 20  # the official CIFAR-100 train file is 155 MB
MAX_OPCODES = 2_000_000  # 50,000 images in the official format: about 200,000; more walk for minutes


class _Refused(pickle.UnpicklingError):
    """The file asked for something that a CIFAR file never holds."""


def _stack_effect(op: pickletools.OpcodeInfo) -> tuple[bool, int, int]:
    """(pops to a mark, items popped below the mark or in all, items pushed) of a pickle opcode."""
    before = [item.name for item in op.stack_before]
    below = before.index("mark") if "mark" in before else len(before)
    return "mark" in before, below, len(op.stack_after)


_STACK_EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}
_TUPLE_OPCODES = {"EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "FROZENSET"}
_KEYS_PER_ITEM = {"SETITEMS": 0.5, "DICT": 0.5, "ADDITEMS": 1, "FROZENSET": 1}
_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}


def _check_opcodes(raw: bytes) -> None:
    """Walk the opcodes without running them; refuse what would crash or stall the unpickler: tuples nested past
    MAX_TUPLE_NESTING, memo indices beyond the file's size (the memo is allocated up to the index), more than
    MAX_ENTRIES dict or set entries, more than MAX_OPCODES opcodes. Stack items carry a bound of their tuple nesting
    (keys nest only via tuples)."""
    stack, marks, memo, entries = [], [], {}, 0
    for count, (op, arg, pos) in enumerate(pickletools.genops(raw)):
        if count == MAX_OPCODES:
            raise _Refused(f"more than {MAX_OPCODES:,} pickle opcodes (a CIFAR-100 training file holds about "
                           "200,000)")
        name = op.name
        if isinstance(arg, int) and not isinstance(arg, bool) and arg.bit_length() > MAX_INT_BITS:
            raise _Refused(f"an integer of more than {MAX_INT_BITS} bits at byte {pos}")
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name == "POP" and marks and marks[-1] == len(stack):  # as the unpickler does: pops the mark
            marks.pop()
            continue
        to_mark, below, pushed = _STACK_EFFECTS[name]
        if name in _GET_OPCODES:
            nesting = memo.get(arg, 0)
        elif to_mark or below:
            start = marks.pop() if to_mark else len(stack)
            entries += 1 if name == "SETITEM" else int((len(stack) - start) * _KEYS_PER_ITEM.get(name, 0))
            if entries > MAX_ENTRIES:
                raise _Refused(f"more than {MAX_ENTRIES} dict or set entries")
            start = max(start - below, 0)
            nesting = max(stack[start:], default=0) + (name in _TUPLE_OPCODES)
            del stack[start:]
            if nesting > MAX_TUPLE_NESTING:
                raise _Refused(f"tuples or frozensets nested more than {MAX_TUPLE_NESTING} deep (byte {pos})")
        else:
            nesting = int(name == "EMPTY_TUPLE")
        stack += [nesting] * pushed
        if name in _PUT_OPCODES:
            index = len(memo) if arg is None else arg
            if index > pos:
                raise _Refused(f"memo index {index} at byte {pos}: larger than the file could need")
            memo[index] = stack[-1] if stack else 0


class _Global:
    """An allowed global: calls a builder that checks its arguments; BUILD on it is refused, `numpy.ndarray`
    (build None) cannot be called."""

    __slots__ = ("name", "build")

    def __init__(self, name: str, build):
        self.name, self.build = name, build

    def __repr__(self) -> str:
        return self.name

    def __call__(self, *args):
        if self.build is None:
            raise _Refused(f"refused to call '{self.name}'")
        return self.build(*args)

    def __setstate__(self, state):
        raise _Refused(f"refused to change '{self.name}'")


class _PendingDtype:
    """A dtype the file names: one of DTYPE_CODES, with the byte order that numpy's BUILD state gives."""

    def __init__(self, code: str):
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        # numpy pickles a plain numeric dtype's state as (3, byteorder, None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and as_text(state[1]) in ("|", "<", ">") and state[2:] == (None, None, None, -1, -1, 0)):
            raise _Refused(f"refused the state {reprlib.repr(state)} of dtype '{self.code}': a plain numeric "
                           "dtype has (3, byteorder, None, None, None, -1, -1, 0)")
        self.byteorder = as_text(state[1])

    def build(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.byteorder)


class _PendingArray:
    """An array from numpy's `_reconstruct`; BUILD gives its shape, dtype and bytes, checked before use."""

    def __init__(self, unpickler: _SafeUnpickler):
        self.unpickler, self.array = unpickler, None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise pickle.UnpicklingError(f"unexpected array state {reprlib.repr(state)}")
        _, shape, dtype, fortran, raw = state
        self.array = self.unpickler.array(raw, dtype, shape, {False: "C", True: "F"}[fortran])


class _SafeUnpickler(pickle.Unpickler):
    """Builds only plain containers, strings, numbers and checked numpy arrays; refuses every other global.
    A file of N bytes may build at most 2N bytes of arrays and bytes (protocol 2 pixels: text -> bytes -> array)."""

    def __init__(self, raw: bytes):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.budget = 2 * len(raw)

    def find_class(self, module: str, name: str):
        builders = {
            ("numpy.core.multiarray", "_reconstruct"): self.reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self.reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self.array,
            ("numpy._core.numeric", "_frombuffer"): self.array,
            ("numpy", "dtype"): self.dtype,
            ("numpy", "ndarray"): None,
            ("_codecs", "encode"): self.latin1_bytes,
            ("__builtin__", "bytes"): self.empty_bytes,
        }
        if (module, name) not in builders:
            raise _Refused(f"refused to load '{module}.{name}': only numpy arrays, dicts, lists, strings and "
                           "numbers are allowed in a CIFAR file")
        return _Global(f"{module}.{name}", builders[(module, name)])

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id: not allowed in a CIFAR file")

    def spend(self, size: int) -> None:
        self.budget -= size
        if self.budget < 0:
            raise _Refused("the file builds more data than twice its size (its bytes used again and again: "
                           "a memory bomb)")

    def reconstruct(self, cls, shape, typecode) -> _PendingArray:
        if not (isinstance(cls, _Global) and cls.name == "numpy.ndarray"):
            raise _Refused(f"refused numpy's _reconstruct of {reprlib.repr(cls)}: only ndarray is allowed")
        return _PendingArray(self)

    def dtype(self, code, align=False, copy=True) -> _PendingDtype:
        code = as_text(code)
        if not isinstance(code, str) or code not in DTYPE_CODES:
            raise _Refused(f"refused dtype {reprlib.repr(code)}: only the plain numeric dtypes "
                           f"{', '.join(DTYPE_CODES)} are allowed")
        return _PendingDtype(code)

    def array(self, raw, dtype, shape, order) -> np.ndarray:
        """numpy's `_frombuffer(raw, dtype, shape, order)`, and the BUILD of a `_reconstruct`ed array."""
        if not isinstance(dtype, _PendingDtype):
            raise _Refused(f"refused an array of {reprlib.repr(dtype)}: only plain numeric dtypes are allowed")
        if not (isinstance(raw, (bytes, bytearray)) and isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and n >= 0 for n in shape) and order in ("C", "F")):
            raise pickle.UnpicklingError(f"malformed array: shape {reprlib.repr(shape)}, order "
                                         f"{reprlib.repr(order)}, data {type(raw).__name__}")
        dtype = dtype.build()
        expected = math.prod(shape) * dtype.itemsize
        if len(raw) != expected:
            raise pickle.UnpicklingError(f"an array of shape {reprlib.repr(shape)} and dtype {dtype} needs "
                                         f"{expected} bytes, the file holds {len(raw)}")
        self.spend(len(raw))
        return np.frombuffer(raw, dtype).reshape(shape, order=order).copy()

    def empty_bytes(self) -> bytes:
        """`bytes()`: how Python 3 writes b"" at protocols 0 to 2."""
        return b""

    def latin1_bytes(self, text, encoding) -> bytes:
        """`_codecs.encode(text, "latin1")`: how Python 3 writes bytes at protocols 0 to 2."""
        if type(text) is not str or encoding != "latin1":
            raise _Refused(f"refused _codecs.encode of {type(text).__name__} with {reprlib.repr(encoding)}: "
                           "only text with 'latin1' is allowed")
        self.spend(len(text))
        return text.encode("latin1")


def as_text(value):
    """Python 2 strings arrive as bytes (encoding="bytes"): their text; anything else as it is."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def open_regular(path: str | Path):
    """Open a regular file for binary reading; a FIFO, device or folder is refused at once (never blocks).
    Raises DatasetError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DatasetError(f"{path}: not a regular file (a folder, FIFO or device is in its place)")
    return open(fd, "rb")


def unpickle(path: Path) -> dict:
    """Read one pickled batch with the safe unpickler: a dict, its text keys as str, its arrays built."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise DatasetError(f"{path}: {size} bytes, more than a CIFAR file holds ({MAX_FILE_BYTES}): not a "
                               "dataset file")
        try:
            raw = handle.read(MAX_FILE_BYTES + 1)
        except (OSError, MemoryError) as exc:
            raise DatasetError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    try:
        _check_opcodes(raw)
        obj = _SafeUnpickler(raw).load()
    except _Refused as exc:
        raise DatasetError(f"{path}: unsafe file, nothing was run: {exc}") from None
    except Exception as exc:  # a hostile or broken file can make the unpickler fail in any way
        reason = " ".join(str(exc).split())[:200]
        raise DatasetError(f"{path}: truncated or corrupt file (expected a pickled dict of a CIFAR "
                           f"batch; reading failed with {type(exc).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    if not all(isinstance(key, (str, bytes)) for key in obj):
        raise DatasetError(f"{path}: expected a dict with text keys, found keys {reprlib.repr(list(obj))}")
    return {as_text(key): _built(path, value) for key, value in obj.items()}


def _built(path: Path, value):
    """The array that a `_PendingArray` stands for; any other value as it is."""
    if not isinstance(value, _PendingArray):
        return value
    if value.array is None:
        raise DatasetError(f"{path}: truncated or corrupt file: an array without its shape and data")
    return value.array
