"""Bad input: each case raises a clear ValueError/TypeError naming the problem, and writes
nothing: ``out``, the running statistics and every other array passed stay bit for bit
as they were."""
from types import SimpleNamespace

import numpy as np
import pytest

import bncpu
from conftest import assert_bitwise_equal, channel_params, random_input, running_stats

C = 3
SHAPE = (4, C, 5)
SENTINEL = 7.0


def make_state():
    """Fresh arguments of every function, valid unless a case spoils one."""
    x = random_input(SHAPE)
    weight, bias = channel_params(C)
    running_mean, running_var = running_stats(C)
    mean, m2, count = bncpu.batch_norm_stats(x)
    return SimpleNamespace(
        x=x, dy=random_input(SHAPE, seed=3), weight=weight, bias=bias,
        running_mean=running_mean, running_var=running_var,
        save_mean=mean.copy(), save_invstd=1 / np.sqrt(m2 / count + 1e-5),
        mean=mean, m2=m2, count=count,
        out=np.full(SHAPE, SENTINEL), read_only_out=read_only(np.full(SHAPE, SENTINEL)),
        single_sample_out=np.full((1, C), SENTINEL),
        # Read-only, strided, byte-swapped, float32 and aliased running statistics.
        read_only=read_only(np.ones(C)), strided=np.ones(2 * C)[::2], swapped=np.ones(C, ">f8"),
        float32=np.ones(C, np.float32), shared=np.ones(2 * C),
        # An out of shape (1, C, 2) whose memory can hold running statistics too.
        stats_out=np.ones((1, C, 2)),
    )


def read_only(array):
    array.flags.writeable = False
    return array


def forward(s, **changes):
    """batch_norm_forward in training, with running statistics and out, as changed."""
    args = dict(input=s.x, weight=s.weight, bias=s.bias, running_mean=s.running_mean,
                running_var=s.running_var, training=True, momentum=0.1, eps=1e-5, out=s.out)
    args.update(changes)
    return bncpu.batch_norm_forward(**args)


def backward(s, **changes):
    args = dict(grad_output=s.dy, input=s.x, weight=s.weight, running_mean=s.running_mean,
                running_var=s.running_var, save_mean=s.save_mean, save_invstd=s.save_invstd,
                training=True, eps=1e-5, out=s.out)
    args.update(changes)
    return bncpu.batch_norm_backward(**args)


def gather(s, **changes):
    args = dict(mean=np.stack([s.mean, s.mean]), m2=np.stack([s.m2, s.m2]),
                count=[s.count, s.count], running_mean=s.running_mean,
                running_var=s.running_var, momentum=0.1, eps=1e-5)
    args.update(changes)
    return bncpu.batch_norm_gather_stats(**args)


def elemt(s, **changes):
    args = dict(input=s.x, weight=s.weight, bias=s.bias, mean=s.mean, invstd=s.save_invstd,
                out=s.out)
    args.update(changes)
    return bncpu.batch_norm_elemt(**args)


def backward_reduce(s, **changes):
    args = dict(grad_output=s.dy, input=s.x, mean=s.mean, invstd=s.save_invstd, weight=s.weight)
    args.update(changes)
    return bncpu.batch_norm_backward_reduce(**args)


def backward_elemt(s, **changes):
    args = dict(grad_output=s.dy, input=s.x, mean=s.mean, invstd=s.save_invstd, weight=s.weight,
                sum_dy=s.mean, sum_dy_xmu=s.m2, count=s.count, out=s.out)
    args.update(changes)
    return bncpu.batch_norm_backward_elemt(**args)


# id: (call on the state, exception, message fragment as a regular expression)
CASES = {
    # Dimensions
    "input 1-D": (lambda s: forward(s, input=np.ones(3)), ValueError, "at least 2 dimensions"),
    "input 0-D": (lambda s: forward(s, input=np.float64(1.0)), ValueError, "at least 2 dimensions"),
    "batch_norm input 1-D": (
        lambda s: bncpu.batch_norm(np.ones(3), s.running_mean, s.running_var, training=True,
                                   out=s.out),
        ValueError, "at least 2 dimensions"),
    "stats input 1-D": (
        lambda s: bncpu.batch_norm_stats(np.ones(3)),
        ValueError, "at least 2 dimensions"),
    "elemt input 1-D": (lambda s: elemt(s, input=np.ones(3)), ValueError, "at least 2 dimensions"),
    # Per-channel arrays of the wrong length or not 1-D
    "weight too long": (
        lambda s: forward(s, weight=np.ones(4)),
        ValueError, "weight should contain 3 elements not 4"),
    "bias too short": (
        lambda s: forward(s, bias=np.ones(2)),
        ValueError, "bias should contain 3 elements not 2"),
    "weight 2-D": (
        lambda s: forward(s, weight=np.ones((1, 3))),
        ValueError, r"^weight has shape \(1, 3\) but must have shape \(3,\), one element "
                    r"per channel: pass weight.reshape\(-1\)$"),
    "weight d2l-shaped (1, C, 1, 1)": (
        lambda s: forward(s, weight=np.ones((1, 3, 1, 1))),
        ValueError, r"^weight has shape \(1, 3, 1, 1\) but must have shape \(3,\),"
                    r" .*weight.reshape\(-1\)$"),
    "bias 2-D of the wrong size": (
        lambda s: forward(s, bias=np.ones((2, 3))),
        ValueError, r"^bias should contain 3 elements not 6 \(it has shape \(2, 3\)\)$"),
    "weight scalar": (
        lambda s: forward(s, weight=1.0),
        ValueError, "weight should contain 3 elements not 1"),
    "running_mean too long": (
        lambda s: forward(s, running_mean=np.zeros(4)),
        ValueError, "running_mean should contain 3 elements not 4"),
    "running_var too short": (
        lambda s: forward(s, running_var=np.ones(2)),
        ValueError, "running_var should contain 3 elements not 2"),
    "running_mean 2-D": (
        lambda s: forward(s, running_mean=np.zeros((3, 1))),
        ValueError, r"running_mean has shape \(3, 1\) but must have shape \(3,\), .*"
                    r"reshape\(-1\), a view"),
    "running_var d2l-shaped (1, C, 1, 1), eval": (
        lambda s: forward(s, training=False, running_var=np.ones((1, C, 1, 1))),
        ValueError, r"running_var has shape \(1, 3, 1, 1\) but must have shape \(3,\)"),
    "eval running_var too long": (
        lambda s: forward(s, training=False, running_var=np.ones(4)),
        ValueError, "running_var should contain 3 elements not 4"),
    # Running statistics that cannot be updated in place
    "running_mean read-only": (
        lambda s: forward(s, running_mean=s.read_only),
        ValueError, "read-only"),
    "running_var read-only": (
        lambda s: forward(s, running_var=s.read_only),
        ValueError, "read-only"),
    "running_mean float32, input float64": (
        lambda s: forward(s, running_mean=s.float32),
        TypeError, "running_mean has dtype float32"),
    "running_var float32, input float64, eval": (
        lambda s: forward(s, training=False, running_var=s.float32),
        TypeError, "running_var has dtype float32"),
    "running_mean float64, input float32": (
        lambda s: forward(s, input=s.x.astype(np.float32)),
        TypeError, "running_mean has dtype float64"),
    "running_mean non-contiguous": (
        lambda s: forward(s, running_mean=s.strided),
        ValueError, "contiguous"),
    "running_var byte-swapped": (
        lambda s: forward(s, running_var=s.swapped),
        TypeError, "running_var has dtype"),
    "running_mean a list": (
        lambda s: forward(s, running_mean=[0.0, 0.0, 0.0]),
        TypeError, "running_mean must be a numpy.ndarray"),
    "running_var masked": (
        lambda s: forward(s, running_var=np.ma.masked_array(np.ones(C))),
        TypeError, "running_var must be a numpy.ndarray"),
    "running_mean without running_var": (
        lambda s: forward(s, running_var=None),
        ValueError, "must be given together"),
    "running stats one array": (
        lambda s: forward(s, running_var=s.running_mean),
        ValueError, "must not share memory"),
    "running stats overlapping": (
        lambda s: forward(s, running_mean=s.shared[:C], running_var=s.shared[1:C + 1]),
        ValueError, "must not share memory"),
    "eval running stats one strided array": (
        lambda s: forward(s, training=False, running_mean=s.strided, running_var=s.strided),
        ValueError, "must not share memory"),
    # One value per channel in training; no statistics in evaluation
    "one value per channel (1, 3)": (
        lambda s: forward(s, input=np.ones((1, 3)), out=s.single_sample_out),
        ValueError,
        r"^Expected more than 1 value per channel when training, got input size \(1, 3\)$"),
    "one value per channel (1, 3, 1, 1)": (
        lambda s: forward(s, input=np.ones((1, 3, 1, 1)), out=s.single_sample_out[..., None, None]),
        ValueError, r"got input size \(1, 3, 1, 1\)"),
    "batch_norm one value per channel": (
        lambda s: bncpu.batch_norm(np.ones((1, 3)), s.running_mean, s.running_var, training=True),
        ValueError, "Expected more than 1 value per channel"),
    "eval without running stats": (
        lambda s: forward(s, training=False, running_mean=None, running_var=None),
        ValueError, "must be given when training=False"),
    "batch_norm eval without running stats": (
        lambda s: bncpu.batch_norm(s.x, None, None, out=s.out),
        ValueError, "must be given when training=False"),
    # eps and momentum
    "eps negative": (lambda s: forward(s, eps=-1e-5), ValueError, "eps must be finite and >= 0"),
    "eps nan": (lambda s: forward(s, eps=float("nan")), ValueError, "eps must be finite"),
    "eps inf": (lambda s: forward(s, eps=float("inf")), ValueError, "eps must be finite"),
    "eps None": (lambda s: forward(s, eps=None), TypeError, "eps must be a real number"),
    "eps string": (lambda s: forward(s, eps="1e-5"), TypeError, "eps must be a real number"),
    "momentum negative": (
        lambda s: forward(s, momentum=-0.1),
        ValueError, r"momentum must be in \[0, 1\]"),
    "momentum above 1": (
        lambda s: forward(s, momentum=1.5),
        ValueError, r"momentum must be in \[0, 1\]"),
    "momentum nan": (
        lambda s: forward(s, momentum=float("nan")),
        ValueError, r"momentum must be in \[0, 1\]"),
    "momentum None": (
        lambda s: forward(s, momentum=None),
        TypeError, "momentum must be a real number"),
    "batch_norm eps negative": (
        lambda s: bncpu.batch_norm(s.x, s.running_mean, s.running_var, eps=-1.0, out=s.out),
        ValueError, "eps"),
    # Input dtypes that are not real numbers
    "input complex": (lambda s: forward(s, input=s.x.astype(complex)), TypeError, "complex128"),
    "input object": (lambda s: forward(s, input=s.x.astype(object)), TypeError, "object"),
    "input string": (lambda s: forward(s, input=np.full(SHAPE, "a")), TypeError, "<U1"),
    "input datetime": (
        lambda s: forward(s, input=np.zeros(SHAPE, "datetime64[s]")),
        TypeError, "datetime64"),
    "input ragged": (
        lambda s: forward(s, input=[[1.0, 2.0], [3.0]]),
        TypeError, "cannot be converted"),
    "weight complex": (
        lambda s: forward(s, weight=np.ones(C, complex)),
        TypeError, "weight has unsupported dtype"),
    "input masked": (
        lambda s: forward(s, input=np.ma.masked_array(s.x)),
        TypeError, "masked array"),
    # out=
    "out a list": (lambda s: forward(s, out=s.x.tolist()), TypeError, "ArrayType"),
    "out wrong shape": (
        lambda s: forward(s, out=np.zeros((4, C, 6))),
        ValueError, r"out has shape \(4, 3, 6\)"),
    "out read-only": (lambda s: forward(s, out=s.read_only_out), ValueError, "out is read-only"),
    "out integer": (lambda s: forward(s, out=np.zeros(SHAPE, np.int64)), TypeError, "same_kind"),
    "out float32 for float32 input cast to int": (
        lambda s: elemt(s, input=s.x.astype(np.float32), out=np.zeros(SHAPE, np.int32)),
        TypeError, "same_kind"),
    # Backward: shapes that disagree, statistics missing
    "backward grad_output shape": (
        lambda s: backward(s, grad_output=np.ones((4, C, 6))),
        ValueError, r"grad_output has shape \(4, 3, 6\) but input has shape \(4, 3, 5\)"),
    "backward grad_output transposed": (
        lambda s: backward(s, grad_output=np.ones((C, 4, 5))),
        ValueError, "grad_output has shape"),
    "backward save_mean length": (
        lambda s: backward(s, save_mean=np.zeros(2)),
        ValueError, "save_mean should contain 3 elements not 2"),
    "backward save_invstd missing": (
        lambda s: backward(s, save_invstd=None),
        ValueError, "save_mean and save_invstd must be given"),
    "backward eval without running stats": (
        lambda s: backward(s, training=False, running_var=None),
        ValueError, "running_mean and running_var must be given"),
    "backward eval running_mean length": (
        lambda s: backward(s, training=False, running_mean=np.zeros(4)),
        ValueError, "running_mean should contain 3 elements not 4"),
    "backward weight length": (
        lambda s: backward(s, weight=np.ones(4)),
        ValueError, "weight should contain 3 elements not 4"),
    "backward eval eps negative": (
        lambda s: backward(s, training=False, eps=-1.0),
        ValueError, "eps"),
    "backward grad_output complex": (
        lambda s: backward(s, grad_output=s.dy.astype(complex)),
        TypeError, "complex128"),
    "backward input 1-D": (
        lambda s: backward(s, input=np.ones(3), grad_output=np.ones(3)),
        ValueError, "at least 2 dimensions"),
    "backward out wrong shape": (
        lambda s: backward(s, out=np.zeros((4, C))),
        ValueError, "out has shape"),
    # Split phase
    "gather shapes disagree": (
        lambda s: gather(s, m2=np.ones((2, 4))),
        ValueError, "mean and m2 must both"),
    "gather 3-D": (
        lambda s: gather(s, mean=np.ones((2, C, 1)), m2=np.ones((2, C, 1))),
        ValueError, r"shape \(P, C\)"),
    "gather count length": (
        lambda s: gather(s, count=[s.count]),
        ValueError, "count must hold 2 integers"),
    "gather count negative": (
        lambda s: gather(s, count=[s.count, -1]),
        ValueError, "count must be >= 0"),
    "gather count float": (
        lambda s: gather(s, count=[20.0, 20.0]),
        ValueError, "count must hold 2 integers"),
    "gather total count 1": (
        lambda s: gather(s, count=[1, 0]),
        ValueError, "Expected more than 1 value"),
    "gather running_mean length": (
        lambda s: gather(s, running_mean=np.zeros(4)),
        ValueError, "running_mean should contain 3 elements not 4"),
    "gather running stats dtypes differ": (
        lambda s: gather(s, running_var=s.float32),
        TypeError, "running_var has dtype float32"),
    "gather running stats one array": (
        lambda s: gather(s, running_var=s.running_mean),
        ValueError, "must not share memory"),
    "gather running stats byte-swapped": (
        lambda s: gather(s, running_mean=s.swapped, running_var=s.swapped.copy()),
        TypeError, "running_mean has dtype >f8, byte-swapped"),
    "gather running_mean integer": (
        lambda s: gather(s, running_mean=np.zeros(C, int)),
        TypeError, "running_mean has dtype int64"),
    "gather running_var read-only": (
        lambda s: gather(s, running_var=s.read_only),
        ValueError, "read-only"),
    "gather momentum": (lambda s: gather(s, momentum=2.0), ValueError, "momentum"),
    "gather eps": (lambda s: gather(s, eps=float("nan")), ValueError, "eps"),
    "gather mean complex": (
        lambda s: gather(s, mean=np.ones((2, C), complex)),
        TypeError, "complex"),
    "elemt mean length": (
        lambda s: elemt(s, mean=np.zeros(4)),
        ValueError, "mean should contain 3 elements not 4"),
    "elemt invstd 2-D": (
        lambda s: elemt(s, invstd=np.ones((1, C))),
        ValueError, r"^invstd has shape \(1, 3\) but must have shape \(3,\), .*"
                    r"invstd.reshape\(-1\)$"),
    "elemt mean (C, 1)": (
        lambda s: elemt(s, mean=np.zeros((C, 1))),
        ValueError, r"^mean has shape \(3, 1\) but must have shape \(3,\)"),
    "elemt bias length": (
        lambda s: elemt(s, bias=np.ones(2)),
        ValueError, "bias should contain 3 elements not 2"),
    "elemt out wrong shape": (
        lambda s: elemt(s, out=np.zeros((4, C, 1))),
        ValueError, "out has shape"),
    "backward_reduce shapes disagree": (
        lambda s: backward_reduce(s, grad_output=np.ones((4, C))),
        ValueError, "grad_output has shape"),
    "backward_reduce mean length": (
        lambda s: backward_reduce(s, mean=np.zeros(2)),
        ValueError, "mean should contain 3 elements not 2"),
    "backward_elemt count 0": (
        lambda s: backward_elemt(s, count=0),
        ValueError, "count must be > 0"),
    "backward_elemt count negative": (
        lambda s: backward_elemt(s, count=-20),
        ValueError, "count must be >= 0"),
    "backward_elemt count float": (
        lambda s: backward_elemt(s, count=20.5),
        TypeError, "count must be an integer"),
    "backward_elemt sum_dy length": (
        lambda s: backward_elemt(s, sum_dy=np.zeros(4)),
        ValueError, "sum_dy should contain 3 elements not 4"),
    "backward_elemt shapes disagree": (
        lambda s: backward_elemt(s, input=np.ones((4, C, 6))),
        ValueError, "grad_output has shape"),
    # One channel and a scalar weight (sizes equal, shape wrong)
    "one channel, scalar weight": (
        lambda s: forward(s, input=np.ones((4, 1, 5)), weight=np.float64(2.0), running_mean=None,
                          running_var=None, out=None),
        ValueError, r"^weight has shape \(\) but must have shape \(1,\), one element per channel: "
                    r"pass weight.reshape\(-1\)$"),
    "one channel, bias (1, 1)": (
        lambda s: forward(s, input=np.ones((4, 1, 5)), bias=np.ones((1, 1)), weight=None,
                          running_mean=None, running_var=None, out=None),
        ValueError, r"^bias has shape \(1, 1\) but must have shape \(1,\)"),
    # Huge numbers name their argument; flags must be bools
    "eps 10**400": (
        lambda s: forward(s, eps=10**400),
        ValueError, r"^eps must be finite and >= 0, got 100000\.\.\. \(an integer of 401 digits\)$"),
    "momentum 10**400": (
        lambda s: forward(s, momentum=10**400),
        ValueError, r"^momentum must be in \[0, 1\], got 100000\.\.\. \(an integer of 401 digits\)$"),
    "momentum -10**400": (
        lambda s: forward(s, momentum=-10**400),
        ValueError, r"^momentum must be in \[0, 1\], got -10000\.\.\."),
    "gather eps 10**400": (lambda s: gather(s, eps=10**400), ValueError, "^eps must be finite"),
    "backward eps 10**400": (lambda s: backward(s, eps=10**400), ValueError, "^eps must be finite"),
    "eps numpy bool": (lambda s: forward(s, eps=np.True_), TypeError, "eps must be a real number"),
    "backward_elemt count 2**63": (
        lambda s: backward_elemt(s, count=2**63),
        ValueError, r"^count must be below 2\*\*63, got 9223372036854775808$"),
    "backward_elemt count 10**400": (
        lambda s: backward_elemt(s, count=10**400),
        ValueError, r"^count must be below 2\*\*63, got 100000\.\.\."),
    "backward_elemt counts summing to 2**63": (
        lambda s: backward_elemt(s, count=np.array([2**62, 2**62], np.uint64)),
        ValueError, r"^the total count must be below 2\*\*63"),
    "backward_elemt counts float": (
        lambda s: backward_elemt(s, count=[10.0, 10.0]),
        TypeError, "count must be an integer or a 1-D array of integers"),
    "backward_elemt counts negative": (
        lambda s: backward_elemt(s, count=[30, -10]),
        ValueError, "count must be >= 0"),
    "backward_elemt counts 2-D": (
        lambda s: backward_elemt(s, count=np.full((2, 1), 10)),
        TypeError, "1-D array of integers"),
    "backward_elemt count bool": (
        lambda s: backward_elemt(s, count=True),
        TypeError, "count must be an integer, got bool"),
    "gather count 2**63": (
        lambda s: gather(s, count=np.array([2**63, 0], np.uint64)),
        ValueError, r"^the total count must be below 2\*\*63"),
    "gather counts summing to 2**63": (
        lambda s: gather(s, count=[2**62, 2**62]),
        ValueError, r"^the total count must be below 2\*\*63"),
    "training a string": (
        lambda s: forward(s, training="no"),
        TypeError, "^training must be a bool, got str$"),
    "training an int": (lambda s: forward(s, training=1), TypeError, "training must be a bool"),
    "training None": (lambda s: forward(s, training=None), TypeError, "training must be a bool"),
    "batch_norm training a string": (
        lambda s: bncpu.batch_norm(s.x, s.running_mean, s.running_var, training="False",
                                   out=s.out),
        TypeError, "training must be a bool"),
    "backward training a string": (
        lambda s: backward(s, training="yes"),
        TypeError, "training must be a bool"),
    "unbiased_running_var a string": (
        lambda s: forward(s, unbiased_running_var="no"),
        TypeError, "unbiased_running_var must be a bool"),
    "instance_norm use_input_stats a string": (
        lambda s: bncpu.instance_norm(s.x, s.running_mean, s.running_var,
                                      use_input_stats="no", out=s.out),
        TypeError, "use_input_stats must be a bool"),
    # out sharing memory with the running statistics it would update
    "out overlapping running_mean": (
        lambda s: forward(s, input=s.x[:1, :, :2], running_mean=s.stats_out.reshape(-1)[:C],
                          out=s.stats_out),
        ValueError, "^out shares memory with running_mean, which is updated in place"),
    "out overlapping running_var": (
        lambda s: forward(s, input=s.x[:1, :, :2], running_var=s.stats_out.reshape(-1)[C:],
                          out=s.stats_out),
        ValueError, "^out shares memory with running_var"),
    "(N, C) out holding running_mean": (
        lambda s: forward(s, input=s.x[:2, :, 0], running_mean=s.stats_out.reshape(-1)[1:C + 1],
                          out=s.stats_out.reshape(2, C)),
        ValueError, "^out shares memory with running_mean"),
    "instance_norm out overlapping running_mean": (
        lambda s: bncpu.instance_norm(s.x[:1, :, :2], s.stats_out.reshape(-1)[:C],
                                      s.running_var, out=s.stats_out),
        ValueError, "^out shares memory with running_mean"),
}


def snapshot(state):
    return {name: np.array(value, copy=True) for name, value in vars(state).items()
            if isinstance(value, np.ndarray)}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_and_writes_nothing(case):
    call, exception, message = CASES[case]
    state = make_state()
    before = snapshot(state)

    with pytest.raises(exception, match=message):
        call(state)

    after = snapshot(state)
    assert after.keys() == before.keys()
    for name in before:
        assert_bitwise_equal(after[name], before[name])
    assert (state.out == SENTINEL).all()


def test_public_names_are_the_api():
    """dir() of the package and of its NumPy submodules shows their API and subpackages,
    nothing imported for internal use (such as os)."""
    import types

    import bncpu.distributed
    import bncpu.nn
    for module in (bncpu, bncpu.nn, bncpu.distributed):
        stray = [name for name in dir(module)
                 if not name.startswith("_") and name not in module.__all__
                 and not (isinstance(getattr(module, name), types.ModuleType)
                          and getattr(module, name).__name__ == f"{module.__name__}.{name}")]
        assert stray == [], (module.__name__, stray)


def test_validation_needs_no_runtime():
    """bncpu._validate is checks only: it imports the standard library and NumPy, not the
    compiled modules (statuses become exceptions in bncpu._status)."""
    import ast
    import inspect

    from bncpu import _validate
    tree = ast.parse(inspect.getsource(_validate))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"math", "numbers", "operator", "numpy"}, imported
