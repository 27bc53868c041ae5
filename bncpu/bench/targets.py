"""The report's ratios and the goals they are judged against.

Every ratio reads "x faster than": another implementation's time over bncpu's, above 1
when bncpu is faster. Against the floor (one pass over the bytes) and, for a fused
operation, batch norm alone, bncpu cannot be faster: there the goal is a ratio close
enough to 1 (e.g. floor >= 0.5: at most twice the floor's time).
"""
import dataclasses
import math

from bncpu.bench.cases import BN_MAIN_OPS, FUSED_OPS, MAIN_SHAPE

# Where the goals come from, for the report's header.
SOURCE = ("the goals set in bncpu's speed rounds (bncpu/bench/targets.py, explained in "
          "docs/speed.md)")

# The ratio names: their implementation's time over bncpu's.
RATIOS = {"torch": "torch", "reference": "reference", "onednn": "onednn",
          "onednn_best": "onednn_best", "floor": "floor", "bn_alone": "bncpu_bn",
          "stock": "stock"}


@dataclasses.dataclass(frozen=True)
class Target:
    """``metric``: a ratio of ``ratios`` ('torch', 'reference', 'onednn', 'onednn_best',
    'floor', 'bn_alone', 'stock'), at least ``bound``."""
    metric: str
    bound: float

    def value(self, ratios):
        return ratios.get(self.metric)

    def met(self, ratios):
        value = self.value(ratios)
        return None if value is None else value >= self.bound

    def __str__(self):
        return f"{self.metric}>={self.bound:.3g}"

    @classmethod
    def parse(cls, text):
        """The target whose ``str`` is ``text`` (as a report's JSON records it)."""
        metric, sign, bound = text.partition(">=")
        if not sign:
            raise ValueError(f"{text!r} is not a target like 'torch>=1': a report from before "
                             f"every ratio read 'x faster than'? Rerun it")
        return cls(metric, float(bound))


def ratios(medians):
    """How many times faster bncpu is than each other implementation: their time over
    bncpu's. oneDNN runs on preallocated buffers, so its ratios are over ``bncpu_out``
    (bncpu into ``out=``); the others allocate their results, as ``bncpu`` does."""
    found = {}
    for name, implementation in RATIOS.items():
        if name.startswith("onednn"):
            own = medians.get("bncpu_out") or medians.get("bncpu")
        else:
            own = medians.get("bncpu")
        if own and medians.get(implementation):
            found[name] = medians[implementation] / own
    if "onednn" in found and "onednn_best" not in found:
        found["onednn_best"] = found["onednn"]   # one layout (peers.ONE_LAYOUT)
    return found


_FEW_CHANNELS = (4, 1, 512, 512)
_SMALL_SHAPES = ((256, 120), (256, 16, 8, 8))
# The first speed round, (32, 64, 56, 56) float32 at 2 threads: {op: (vs torch, vs floor)}.
_MAIN_TARGETS = {"bn_fwd_train": (4.0, 1 / 2.0), "bn_fwd_eval": (1.0, 1 / 1.25),
                 "bn_bwd_train": (3.0, None)}
# Fused batch norm, 2 threads, float32: the training forward within 1.1x the time of batch
# norm alone and 4x faster than torch's composition (batch norm, [add_,] relu_); the
# backward 2x faster than threshold_backward + batch-norm backward; inference 1.8x faster
# than torch, within 1.1x the floor's time.
_FUSED_TARGETS = {"bnr_fwd_train": (("bn_alone", 1 / 1.1), ("torch", 4.0)),
                  "bnar_fwd_train": (("torch", 4.0),),
                  "bnr_bwd_train": (("torch", 2.0),),
                  "bnr_fwd_eval": (("torch", 1.8), ("floor", 1 / 1.1))}
_OTHER_NORMS = ("layer_norm", "group_norm", "instance_norm", "rms_norm")
# Keras on the jax backend, 2 threads, float32: bncpu.keras's training step at least 2x
# faster than keras.layers.BatchNormalization's (the Keras integration's goal; its
# tensorflow and torch goals are benchmarks/keras_jax.py's, other processes).
_FRAMEWORK_TARGETS = {"keras_bn_step": 2.0}


def targets(case, n_threads):
    """The goals that apply to ``case`` timed at ``n_threads``."""
    found = []
    if case.op in BN_MAIN_OPS or case.op in FUSED_OPS or case.family in _OTHER_NORMS:
        # Not slower than PyTorch on any row, at any thread count; the small shapes of
        # the first round also: per-call time within 1.5x of PyTorch's.
        found.append(Target("torch", 1.0))
        if case.shape in _SMALL_SHAPES:
            found.append(Target("torch", 1 / 1.5))
    if case.dtype == "float32" and case.op in BN_MAIN_OPS:
        # oneDNN: within 0.9x of its best layout on every batch-norm shape; (N, C) input,
        # where it has one layout, at least as fast; channels-last at least as fast as
        # oneDNN on the same NHWC data.
        if case.axis == -1:
            found.append(Target("onednn", 1.0))
        else:
            found.append(Target("onednn_best", 1.0 if len(case.shape) == 2 else 0.9))
        # Short rows (S = 1, S = 49) at the streaming floor in eval, within 1.3x of its
        # time in the training forward.
        if math.prod(case.shape[2:]) in (1, 49) and case.op in ("bn_fwd_eval", "bn_fwd_train"):
            found.append(Target("floor", 1.0 if case.op == "bn_fwd_eval" else 1 / 1.3))
    if case.dtype == "float32" and case.family == "layer_norm":
        found.append(Target("onednn", 1.0))
    if n_threads != 2 or case.dtype != "float32":
        return found
    if case.op in _MAIN_TARGETS and case.shape in (MAIN_SHAPE, _FEW_CHANNELS):
        vs_torch, vs_floor = _MAIN_TARGETS[case.op]
        if vs_torch > 1.0:
            found.append(Target("torch", vs_torch))
        if case.shape == MAIN_SHAPE:
            if vs_floor is not None:
                found.append(Target("floor", vs_floor))
            found.append(Target("reference", 20.0))
    if case.family in _OTHER_NORMS:
        found.append(Target("torch", 1.5))
        if case.op.endswith("_fwd"):
            found.append(Target("floor", 1 / 2.0))
    if case.op in _FUSED_TARGETS:
        found += [Target(metric, bound) for metric, bound in _FUSED_TARGETS[case.op]]
    if case.op in _FRAMEWORK_TARGETS:
        found.append(Target("stock", _FRAMEWORK_TARGETS[case.op]))
    return found
