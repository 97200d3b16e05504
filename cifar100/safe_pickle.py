"""Reading a pickled CIFAR batch without running it: only what the official files hold is built (numpy arrays of
plain numeric dtypes, dicts, lists, bytes, strings, numbers); anything else, and any file that would crash, stall or
exhaust the unpickler, is refused in one line naming the file. Also the one opener of regular files."""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import stat
from pathlib import Path

import numpy as np

from cifar100.config import DatasetError, printable, shown

MAX_FILE_BYTES = 512 << 20  # the official CIFAR-100 training file is 155 MB
MAX_OPCODES = 2_000_000  # 50,000 images in the official format: about 200,000
MAX_ENTRIES = 2_000  # dict and set entries, counted as items set (official: under 10); collisions cost n**2
MAX_DEPTH = 100  # tuples within a tuple, nested or repeated: hashing a deeper one overflows the C stack, one
# holding the same tuple twice at each of n levels takes 2**n steps (hashes of tuples are not cached)
DTYPES = ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")


class Refused(pickle.UnpicklingError):
    """The file asks for something a CIFAR file never holds."""


def _stack_effect(op) -> tuple[bool, int, int]:
    """(pops to a mark, items popped below the mark or in all, items pushed) of a pickle opcode."""
    before = [item.name for item in op.stack_before]
    return "mark" in before, before.index("mark") if "mark" in before else len(before), len(op.stack_after)


EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}
TUPLES = {"EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "FROZENSET"}


def check_opcodes(raw: bytes) -> None:
    """Walk the opcodes without running them and refuse what could crash or stall the unpickler: too many
    opcodes or dict entries, huge integers, tuples nested too deep (hashing one as a key overflows the C stack),
    memo indices beyond what the file could need (the memo is allocated up to the index). Each stack item
    carries its tuple nesting (the tuples it holds, counted with repeats)."""
    stack, marks, memo, entries = [], [], {}, 0
    for count, (op, arg, pos) in enumerate(pickletools.genops(raw)):
        if count >= MAX_OPCODES:
            raise Refused(f"more than {MAX_OPCODES:,} pickle opcodes (a CIFAR-100 training file holds about 200,000)")
        if isinstance(arg, int) and not isinstance(arg, bool) and arg.bit_length() > 256:
            raise Refused(f"an integer of more than 256 bits at byte {pos}")
        if op.name == "MARK" or op.name == "POP" and marks and marks[-1] == len(stack):
            marks.append(len(stack)) if op.name == "MARK" else marks.pop()
            continue
        to_mark, below, pushed = EFFECTS[op.name]
        if "GET" in op.name:
            nesting = memo.get(arg, 0)
        elif to_mark or below:
            start = marks.pop() if to_mark else len(stack)
            entries += (op.name in ("SETITEM", "SETITEMS", "DICT", "ADDITEMS", "FROZENSET")) * max(
                1, len(stack) - start)
            if entries > MAX_ENTRIES:
                raise Refused(f"more than {MAX_ENTRIES} dict or set entries")
            start = max(start - below, 0)
            nesting = sum(stack[start:]) + 1 if op.name in TUPLES else max(stack[start:], default=0)
            del stack[start:]
            if nesting > MAX_DEPTH:
                raise Refused(f"tuples nested more than {MAX_DEPTH} deep (or repeated within a tuple) at byte {pos}")
        else:
            nesting = int(op.name == "EMPTY_TUPLE")
        stack += [nesting] * pushed
        if "PUT" in op.name or op.name == "MEMOIZE":
            index = len(memo) if arg is None else arg
            if index > pos:
                raise Refused(f"memo index {index} at byte {pos}: larger than the file could need")
            memo[index] = stack[-1] if stack else 0


class _SafeUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays of plain numeric dtypes; refuses every other global.
    A file of N bytes may build at most 2N bytes of arrays (its bytes cannot be used again and again)."""

    def __init__(self, raw: bytes):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.budget = 2 * len(raw)

    def find_class(self, module: str, name: str):
        allowed = {("numpy.core.multiarray", "_reconstruct"): self.reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): self.reconstruct,
                   ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): self.dtype, ("_codecs", "encode"): self.encode,
                   ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}
        if (module, name) not in allowed:
            raise Refused(f"refused to load '{module}.{name}': a CIFAR file holds only arrays, dicts, lists, "
                          "strings and numbers")
        return allowed[(module, name)]

    def persistent_load(self, pid):
        raise Refused("refused a persistent id")

    def reconstruct(self, cls, shape, typecode):
        if cls is not _NDARRAY:
            raise Refused("numpy's _reconstruct of anything but ndarray")
        return _Array(self)

    def dtype(self, code, align=False, copy=True):
        code = code.decode("latin1") if isinstance(code, bytes) else code
        if code not in DTYPES:
            raise Refused(f"refused dtype {shown(code)}: only {', '.join(DTYPES)}")
        return _Dtype(code)

    def encode(self, text, encoding):
        if type(text) is not str or encoding != "latin1":
            raise Refused("_codecs.encode of anything but text in latin1")
        self.spend(len(text))
        return text.encode("latin1")

    def spend(self, size: int) -> None:
        self.budget -= size
        if self.budget < 0:
            raise Refused("the file builds more than twice its size of data (a memory bomb)")


_NDARRAY = object()  # numpy.ndarray as a name for _reconstruct only: never called (it would allocate any shape)


def _empty_bytes() -> bytes:
    """`bytes()`, as Python 3 writes b"" at protocol 2 (never bytes(n): it would allocate n bytes)."""
    return b""


class _Dtype:
    """A dtype the file names; numpy's BUILD gives its byte order."""

    def __init__(self, code: str):
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and state[1] in (b"|", b"<", b">", "|", "<", ">")
                and state[2:] == (None, None, None, -1, -1, 0)):
            raise Refused(f"refused the dtype state {shown(state)}")
        order = state[1].decode() if isinstance(state[1], bytes) else state[1]
        self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """An array from numpy's `_reconstruct`: BUILD gives its shape, dtype and bytes, checked before use."""

    def __init__(self, unpickler: _SafeUnpickler):
        self.unpickler, self.array = unpickler, None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _Dtype)
                and isinstance(state[4], (bytes, bytearray)) and isinstance(state[1], tuple) and len(state[1]) <= 8
                and all(type(n) is int and n >= 0 for n in state[1])):
            raise Refused("a malformed array (shape, dtype or data)")
        _, shape, dtype, fortran, raw = state
        if math.prod(shape) * dtype.dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(f"an array of shape {shown(shape)} whose data holds {len(raw)} bytes")
        self.unpickler.spend(len(raw))
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


def open_regular(path: Path, limit: int):
    """A regular file of at most `limit` bytes, opened for reading (a FIFO or device never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        found = f"{info.st_size:,} bytes" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise DatasetError(f"{path}: expected a regular file of at most {limit:,} bytes, found {found}")
    return open(fd, "rb")


def unpickle(path: Path) -> dict:
    """One pickled CIFAR batch, read safely: a dict with text keys."""
    with open_regular(path, MAX_FILE_BYTES) as handle:
        raw = handle.read()
    try:
        check_opcodes(raw)
        content = _SafeUnpickler(raw).load()
        if not isinstance(content, dict):
            raise pickle.UnpicklingError(f"expected a dict, found {type(content).__name__}")
        content = {as_text(key): value.array if isinstance(value, _Array) else value for key, value in content.items()}
    except Refused as exc:
        raise DatasetError(f"{path}: unsafe file, nothing was run: {exc}") from None
    except Exception as exc:  # a broken or hostile file can fail the unpickler in any way
        raise DatasetError(f"{path}: not a CIFAR batch (a pickled dict); reading failed: "
                           f"{type(exc).__name__}: {printable(exc)[:200]}") from None
    if any(value is None for value in content.values()) or any(isinstance(v, _Array) for v in content.values()):
        raise DatasetError(f"{path}: an array without its data (truncated?)")
    return content


def as_text(value):
    """Python 2 strings arrive as bytes (encoding="bytes"): their text; anything else as it is."""
    return value.decode("latin1") if isinstance(value, bytes) else value
