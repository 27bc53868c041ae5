"""oneDNN as a peer in the speed report and the benchmark suite: a small ctypes harness over
oneDNN's C API (``libdnnl``, Intel's library of deep-learning primitives).

It needs oneDNN 3.2 as the optional wheels ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp``
2023.2.0 install it (``pip install 'bncpu[bench]'``): the GNU OpenMP build, so that bncpu,
torch and oneDNN share one OpenMP runtime and one thread count. Without them every call
here raises ``Unavailable`` and the report leaves the column out, saying why.

What is timed is one ``dnnl_primitive_execute`` (plus the stream wait) on buffers made
beforehand, 64-byte aligned, in the layout asked for:

``plain``    the caller's layout: NCHW (``abcd``) or (N, C) (``ab``), rows for layer norm;
``nhwc``     channels last (``acdb``);
``nChw8c``   oneDNN's blocked layout for AVX2 (``aBcd8b``: 8 channels innermost, C padded);
``nChw16c``  the same for AVX-512 (``aBcd16b``: 16 channels innermost).

oneDNN runs a blocked layout that does not match the CPU's vector width with its slow
reference code (``ref:any``); ``Primitive.implementation`` names what it picked, and the
report's "best layout" leaves reference implementations out.

Primitives: batch norm forward (training: batch statistics out; inference: running
statistics in), batch norm backward (both modes, scale and shift gradients), layer norm
forward and backward over the last dimension (a multi-dimensional normalized shape is the
same math on the flattened rows). oneDNN 3.2 has no group, instance or RMS norm, no
batch-norm split-phase primitives and no float64 normalization on the CPU: those are
``Unavailable``. Running statistics: oneDNN returns the batch's mean and variance and leaves
the update to the framework (C values per call, nothing measurable).

The enum values below are oneDNN 3.2's (``dnnl_types.h``); ``_Library`` checks the version
and, through oneDNN's own ``dnnl_fmt_tag2str``/``dnnl_prop_kind2str``, that each value
means what this module assumes, so another version is refused rather than misused.
"""
import ctypes
import ctypes.util
import functools
import glob
import os
import sys
import time

import numpy as np

# Raised when oneDNN cannot run something: not installed, another version, no such
# primitive or only its reference code.
from bncpu.bench.timing import Unavailable


# oneDNN 3.2 constants (dnnl_types.h, dnnl_common_types.h).
_F32 = 3
_TAGS = {"a": 2, "ab": 3, "abcd": 5, "acdb": 22, "aBcd16b": 78, "aBcd8b": 102}
_LAYOUT_TAGS = {"plain": "abcd", "nhwc": "acdb", "nChw8c": "aBcd8b", "nChw16c": "aBcd16b"}
_BLOCKS = {"nChw8c": 8, "nChw16c": 16}
_FORWARD_TRAINING, _FORWARD_INFERENCE, _BACKWARD = 64, 96, 128
_USE_GLOBAL_STATS, _USE_SCALE, _USE_SHIFT = 1, 2, 4
_ARG = {"src": 1, "dst": 17, "mean": 49, "variance": 50, "scale": 51, "shift": 52,
        "diff_src": 129, "diff_dst": 145, "diff_scale": 255, "diff_shift": 256}
_CPU_ENGINE, _STREAM_DEFAULT = 1, 1
_QUERY_IMPL_INFO_STR = 8
_MAX_NDIMS = 12
_ALIGNMENT = 64

LAYOUTS = tuple(_LAYOUT_TAGS)


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]


def _candidates():
    """Where the wheel puts libdnnl: ``<prefix>/lib`` of this environment."""
    names = []
    if os.environ.get("BNCPU_ONEDNN_LIBRARY"):
        names.append(os.environ["BNCPU_ONEDNN_LIBRARY"])
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        names += sorted(glob.glob(os.path.join(prefix, "lib", "libdnnl.so*")))
    found = ctypes.util.find_library("dnnl")
    if found:
        names.append(found)
    return names


class _Library:
    """libdnnl with its engine and stream, checked to be the 3.2 this module knows."""

    def __init__(self):
        self.dll = None
        errors = []
        for name in _candidates():
            try:
                self.dll = ctypes.CDLL(name)
                self.path = name
                break
            except OSError as error:
                errors.append(str(error))
        if self.dll is None:
            raise Unavailable("oneDNN not installed (pip install 'bncpu[bench]': "
                              "onednn-cpu-gomp==2023.2.0)" + (f"; {errors[0]}" if errors else ""))
        dll = self.dll
        dll.dnnl_version.restype = ctypes.POINTER(_Version)
        version = dll.dnnl_version().contents
        self.version = f"{version.major}.{version.minor}.{version.patch}"
        if (version.major, version.minor) != (3, 2):
            raise Unavailable(f"oneDNN {self.version} found, this harness knows 3.2")
        for function in ("dnnl_fmt_tag2str", "dnnl_prop_kind2str", "dnnl_dt2str"):
            getattr(dll, function).restype = ctypes.c_char_p
        names = {**{tag: dll.dnnl_fmt_tag2str(value) for tag, value in _TAGS.items()},
                 "f32": dll.dnnl_dt2str(_F32),
                 "forward_training": dll.dnnl_prop_kind2str(_FORWARD_TRAINING),
                 "forward_inference": dll.dnnl_prop_kind2str(_FORWARD_INFERENCE),
                 "backward": dll.dnnl_prop_kind2str(_BACKWARD)}
        wrong = {name: got for name, got in names.items() if got.decode() != name}
        if wrong:
            raise Unavailable(f"oneDNN {self.version}: unexpected enum values {wrong}")
        dll.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        dll.dnnl_memory_desc_get_size.argtypes = (ctypes.c_void_p,)
        dll.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
        dll.dnnl_primitive_desc_query_md.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        dll.dnnl_primitive_execute.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                               ctypes.POINTER(_ExecArg))
        dll.dnnl_stream_wait.argtypes = (ctypes.c_void_p,)
        self.engine = ctypes.c_void_p()
        self.check(dll.dnnl_engine_create(ctypes.byref(self.engine), _CPU_ENGINE, 0),
                   "dnnl_engine_create")
        self.stream = ctypes.c_void_p()
        self.check(dll.dnnl_stream_create(ctypes.byref(self.stream), self.engine,
                                          _STREAM_DEFAULT), "dnnl_stream_create")
        try:
            self.omp_set_num_threads = ctypes.CDLL("libgomp.so.1").omp_set_num_threads
        except (OSError, AttributeError):
            self.omp_set_num_threads = None

    @staticmethod
    def check(status, what):
        if status != 0:
            raise Unavailable(f"oneDNN {what} failed (status {status})")

    def memory_desc(self, shape, tag):
        dims = (ctypes.c_int64 * _MAX_NDIMS)(*shape)
        desc = ctypes.c_void_p()
        self.check(self.dll.dnnl_memory_desc_create_with_tag(
            ctypes.byref(desc), len(shape), dims, _F32, _TAGS[tag]), f"memory desc {tag}")
        return desc

    def memory(self, desc, array):
        memory = ctypes.c_void_p()
        self.check(self.dll.dnnl_memory_create(ctypes.byref(memory), desc, self.engine,
                                               ctypes.c_void_p(array.ctypes.data)),
                   "dnnl_memory_create")
        return memory


@functools.lru_cache(maxsize=None)
def _library():
    try:
        return _Library(), None
    except Unavailable as error:
        return None, error


def library():
    """The loaded oneDNN, or raise ``Unavailable`` saying why not."""
    loaded, error = _library()
    if loaded is None:
        raise error
    return loaded


def version():
    """oneDNN's version string, or None when it cannot be used."""
    loaded, _ = _library()
    return None if loaded is None else loaded.version


def unavailable_reason():
    """Why oneDNN cannot be used here (None when it can)."""
    _, error = _library()
    return None if error is None else str(error)


def aligned_empty(size):
    """A float32 array of ``size`` elements whose data starts on a 64-byte boundary."""
    raw = np.empty(size * 4 + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset:offset + size * 4].view(np.float32)


# ---------------------------------------------------------------------------------------
# Layouts: NCHW data to and from oneDNN's buffers
# ---------------------------------------------------------------------------------------
def _blocked_channels(channels, block):
    return -(-channels // block) * block


def to_layout(x, layout):
    """NCHW (or (N, C), or rows) float32 ``x`` in ``layout``, as a flat aligned buffer.
    Converted one sample at a time: a transposing copy of a whole 100 MB tensor misses
    the cache on every element and takes seconds."""
    buffer = aligned_empty(_buffer_size(x.shape, layout))
    if layout == "plain":
        buffer[...] = x.reshape(-1)
        return buffer
    n, c, h, w = x.shape
    if layout == "nhwc":
        target = buffer.reshape(n, h, w, c)
        for sample in range(n):
            target[sample] = x[sample].transpose(1, 2, 0)
        return buffer
    width = _BLOCKS[layout]
    blocks = _blocked_channels(c, width) // width
    target = buffer.reshape(n, blocks, h, w, width)
    if c % width:
        target[...] = 0.0   # the padding channels
    for sample in range(n):
        for block in range(blocks):
            channels = x[sample, block * width:(block + 1) * width]
            target[sample, block, :, :, :len(channels)] = channels.transpose(1, 2, 0)
    return buffer


def from_layout(buffer, shape, layout):
    """The inverse of ``to_layout``: an NCHW array of ``shape``."""
    if layout == "nhwc":
        n, c, h, w = shape
        return buffer.reshape(n, h, w, c).transpose(0, 3, 1, 2).copy()
    if layout in _BLOCKS:
        n, c, h, w = shape
        blocked = buffer.reshape(n, -1, h, w, _BLOCKS[layout]).transpose(0, 1, 4, 2, 3)
        return blocked.reshape(n, -1, h, w)[:, :c].copy()
    return buffer.reshape(shape).copy()


def _buffer_size(shape, layout):
    if layout in _BLOCKS:
        n, c, h, w = shape
        return n * _blocked_channels(c, _BLOCKS[layout]) * h * w
    return int(np.prod(shape))


# ---------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------
class Primitive:
    """One oneDNN primitive with its buffers: calling it runs the primitive once.

    ``buffers`` maps argument names ('src', 'dst', 'mean', ...) to the aligned float32
    arrays bound to them; ``layout`` and ``shape`` say how to read the tensor ones back
    (``from_layout``)."""

    def __init__(self, lib, pd, buffers, descs, layout, shape):
        self.lib = lib
        self.layout = layout
        self.shape = shape
        self.buffers = buffers
        self._descs = descs   # kept alive with the memories made from them
        self._pd = pd
        self.implementation = _implementation(lib, pd)
        self._primitive = ctypes.c_void_p()
        lib.check(lib.dll.dnnl_primitive_create(ctypes.byref(self._primitive), pd),
                  "dnnl_primitive_create")
        self._memories = {name: lib.memory(descs[name], array) for name, array in buffers.items()}
        self._args = (_ExecArg * len(buffers))(
            *[_ExecArg(_ARG[name], memory.value) for name, memory in self._memories.items()])
        self._execute = lib.dll.dnnl_primitive_execute
        self._wait = lib.dll.dnnl_stream_wait

    def __call__(self):
        status = self._execute(self._primitive, self.lib.stream, len(self._args), self._args)
        if status != 0:
            raise RuntimeError(f"oneDNN primitive failed (status {status})")
        self._wait(self.lib.stream)

    def __del__(self):
        dll = self.lib.dll
        for memory in self._memories.values():
            dll.dnnl_memory_destroy(memory)
        dll.dnnl_primitive_destroy(self._primitive)
        dll.dnnl_primitive_desc_destroy(self._pd)
        for desc in self._descs.values():
            dll.dnnl_memory_desc_destroy(desc)


def _tensor_tag(shape, layout):
    if len(shape) == 2:
        if layout != "plain":
            raise Unavailable(f"2-D input: oneDNN has only the plain layout, not {layout}")
        return "ab"
    if len(shape) != 4:
        raise Unavailable(f"{len(shape)}-D input: this harness runs 2-D and 4-D batch norm")
    return _LAYOUT_TAGS[layout]


def _implementation(lib, pd):
    """The name of the implementation oneDNN chose for a primitive descriptor."""
    name = ctypes.c_char_p()
    lib.check(lib.dll.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(name)),
              "implementation name")
    return name.value.decode()


def batch_norm(kind, x, weight, bias, mean, variance, dy=None, *, layout="plain", eps=1e-5,
               optimized_only=False):
    """A batch-norm primitive on ``x`` (N, C) or (N, C, H, W), float32.

    ``kind``: 'forward_training' (mean and variance are outputs), 'forward_inference'
    (mean and variance are the running statistics), 'backward_training' or
    'backward_inference' (mean and variance are the batch's or the running ones; ``dy``
    the output gradient). Weight and bias are oneDNN's scale and shift.
    ``optimized_only``: raise ``Unavailable`` before making any buffer when oneDNN would
    run this layout with its reference code."""
    lib = library()
    shape = tuple(x.shape)
    tag = _tensor_tag(shape, layout)
    global_stats = _USE_GLOBAL_STATS if kind.endswith("inference") else 0
    flags = _USE_SCALE | _USE_SHIFT | global_stats
    channels = shape[1]
    descs = {name: lib.memory_desc(shape, tag)
             for name in ("src", "dst", "diff_src", "diff_dst")}
    for name in ("mean", "variance", "scale", "shift", "diff_scale", "diff_shift"):
        descs[name] = lib.memory_desc((channels,), "a")
    forward_pd = ctypes.c_void_p()
    forward_kind = _FORWARD_INFERENCE if kind == "forward_inference" else _FORWARD_TRAINING
    lib.check(lib.dll.dnnl_batch_normalization_forward_primitive_desc_create(
        ctypes.byref(forward_pd), lib.engine, forward_kind, descs["src"], descs["dst"],
        ctypes.c_float(eps), flags, None), "batch norm forward primitive")
    if kind.startswith("forward"):
        pd = forward_pd
    else:
        pd = ctypes.c_void_p()
        lib.check(lib.dll.dnnl_batch_normalization_backward_primitive_desc_create(
            ctypes.byref(pd), lib.engine, _BACKWARD, descs["diff_src"], descs["diff_dst"],
            descs["src"], ctypes.c_float(eps), flags, forward_pd, None),
            "batch norm backward primitive")
        lib.dll.dnnl_primitive_desc_destroy(forward_pd)
    implementation = _implementation(lib, pd)
    if optimized_only and implementation.startswith("ref"):
        lib.dll.dnnl_primitive_desc_destroy(pd)
        for desc in descs.values():
            lib.dll.dnnl_memory_desc_destroy(desc)
        raise Unavailable(f"oneDNN runs {layout} with its reference code ({implementation})")
    size = _buffer_size(shape, layout)
    buffers = {"src": to_layout(x, layout), "mean": _copy(mean), "variance": _copy(variance),
               "scale": _copy(weight)}
    if kind.startswith("forward"):
        buffers["shift"] = _copy(bias)
        buffers["dst"] = aligned_empty(size)
        names = ("src", "dst", "mean", "variance", "scale", "shift")
    else:
        buffers["diff_dst"] = to_layout(dy, layout)
        buffers["diff_src"] = aligned_empty(size)
        buffers["diff_scale"] = aligned_empty(channels)
        buffers["diff_shift"] = aligned_empty(channels)
        names = ("src", "diff_dst", "mean", "variance", "scale", "diff_src", "diff_scale",
                 "diff_shift")
    for name in [name for name in descs if name not in names]:
        lib.dll.dnnl_memory_desc_destroy(descs.pop(name))
    return Primitive(lib, pd, {name: buffers[name] for name in names}, descs, layout, shape)


def layer_norm(kind, x, weight, bias, mean=None, variance=None, dy=None, *, eps=1e-5):
    """A layer-norm primitive over the last dimension of ``x`` (rows, D), float32:
    'forward_training' (mean and variance out) or 'backward' (the forward's mean and
    variance in, ``dy`` the output gradient)."""
    lib = library()
    rows, width = x.shape
    descs = {name: lib.memory_desc(x.shape, "ab") for name in ("src", "dst", "diff_src",
                                                                 "diff_dst")}
    for name in ("mean", "variance"):
        descs[name] = lib.memory_desc((rows,), "a")
    for name in ("scale", "shift", "diff_scale", "diff_shift"):
        descs[name] = lib.memory_desc((width,), "a")
    flags = _USE_SCALE | _USE_SHIFT
    forward_pd = ctypes.c_void_p()
    lib.check(lib.dll.dnnl_layer_normalization_forward_primitive_desc_create(
        ctypes.byref(forward_pd), lib.engine, _FORWARD_TRAINING, descs["src"], descs["dst"],
        descs["mean"], ctypes.c_float(eps), flags, None), "layer norm forward primitive")
    buffers = {"src": _copy(x), "scale": _copy(weight), "shift": _copy(bias)}
    if kind == "forward_training":
        pd = forward_pd
        buffers.update(dst=aligned_empty(x.size), mean=aligned_empty(rows),
                       variance=aligned_empty(rows))
        names = ("src", "dst", "mean", "variance", "scale", "shift")
    else:
        pd = ctypes.c_void_p()
        lib.check(lib.dll.dnnl_layer_normalization_backward_primitive_desc_create(
            ctypes.byref(pd), lib.engine, _BACKWARD, descs["diff_src"], descs["diff_dst"],
            descs["src"], descs["mean"], ctypes.c_float(eps), flags, forward_pd, None),
            "layer norm backward primitive")
        lib.dll.dnnl_primitive_desc_destroy(forward_pd)
        buffers.update(diff_dst=_copy(dy), mean=_copy(mean), variance=_copy(variance),
                       diff_src=aligned_empty(x.size), diff_scale=aligned_empty(width),
                       diff_shift=aligned_empty(width))
        # oneDNN 3.2's layer-norm backward takes the shift as an input too.
        names = ("src", "diff_dst", "mean", "variance", "scale", "shift", "diff_src",
                 "diff_scale", "diff_shift")
    for name in [name for name in descs if name not in names]:
        lib.dll.dnnl_memory_desc_destroy(descs.pop(name))
    return Primitive(lib, pd, {name: buffers[name] for name in names}, descs, "plain", x.shape)


def _copy(array):
    """A float32 copy of ``array``, flat, 64-byte aligned."""
    values = np.ascontiguousarray(array, np.float32).reshape(-1)
    buffer = aligned_empty(values.size)
    buffer[...] = values
    return buffer


def set_num_threads(n_threads):
    """oneDNN's GNU OpenMP build runs ``omp_get_max_threads()`` threads: set it for this
    (the calling) thread."""
    lib = library()
    if lib.omp_set_num_threads is not None:
        lib.omp_set_num_threads(int(n_threads))


def fastest(primitives, calls=2):
    """The primitive of ``primitives`` with the least time over ``calls`` calls (each one
    called once first), oneDNN's reference implementations left out unless nothing else
    is there: how the report picks oneDNN's best layout for a shape."""
    optimized = [p for p in primitives if not p.implementation.startswith("ref")]
    primitives = optimized or primitives
    def cost(primitive):
        primitive()
        start = time.perf_counter()
        for _ in range(calls):
            primitive()
        return time.perf_counter() - start
    return min(primitives, key=cost)
