"""The speed report's machinery: the oneDNN harness computes what bncpu computes (so the
oneDNN column times the same work), the timing harness keeps the reference out of the
round-robin, and the report runs end to end on a small case."""
import json

import numpy as np
import pytest

import bncpu
from bncpu import _bench, _onednn
from bncpu import __main__ as report


@pytest.fixture(autouse=True)
def _default_threads():
    """The report sets bncpu's (and torch's) thread count: restore the default after each
    test, so that later tests (e.g. the C API's, which compare thread counts) see it."""
    try:
        import torch
    except ImportError:
        torch = None
    torch_threads = torch.get_num_threads() if torch is not None else None
    yield
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)   # torch's setting is OpenMP's default too
    bncpu.set_num_threads(0)


def _require_onednn():
    reason = _onednn.unavailable_reason()
    if reason is not None:
        pytest.skip(f"oneDNN harness not usable: {reason}")


def _close(actual, expected, tolerance=2e-5):
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("shape", [(4, 32, 5, 7), (3, 6, 4, 4), (2, 1, 3, 5), (16, 20)])
@pytest.mark.parametrize("layout", _onednn.LAYOUTS)
def test_onednn_batch_norm_agrees_with_bncpu(shape, layout):
    _require_onednn()
    if len(shape) == 2 and layout != "plain":
        with pytest.raises(_onednn.Unavailable, match="plain layout"):
            _onednn.batch_norm("forward_training", np.zeros(shape, np.float32),
                               *[np.ones(shape[1], np.float32)] * 4, layout=layout)
        return
    rng = np.random.default_rng(1)
    channels = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5
    dy = rng.standard_normal(shape, dtype=np.float32)
    weight, bias = rng.standard_normal((2, channels), dtype=np.float32)
    running_mean = rng.standard_normal(channels, dtype=np.float32)
    running_var = rng.random(channels, dtype=np.float32) + 0.5
    y, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True,
                                                         0.1, 1e-5)
    variance = 1.0 / save_invstd.astype(np.float64) ** 2 - 1e-5

    def run(kind, mean, var, grad=None):
        primitive = _onednn.batch_norm(kind, x, weight, bias, mean, var, grad, layout=layout)
        primitive()
        return primitive

    def tensor(primitive, name):
        return _onednn.from_layout(primitive.buffers[name], shape, layout)

    forward = run("forward_training", np.zeros(channels), np.ones(channels))
    _close(tensor(forward, "dst"), y)
    _close(forward.buffers["mean"], save_mean)
    _close(forward.buffers["variance"], variance, 1e-4)

    expected = bncpu.batch_norm_forward(x, weight, bias, running_mean, running_var, False,
                                        0.1, 1e-5)[0]
    _close(tensor(run("forward_inference", running_mean, running_var), "dst"), expected)

    dx, dweight, dbias = bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean,
                                                   save_invstd, True, 1e-5)
    backward = run("backward_training", save_mean, variance, dy)
    _close(tensor(backward, "diff_src"), dx)
    _close(backward.buffers["diff_scale"], dweight, 1e-4)
    _close(backward.buffers["diff_shift"], dbias, 1e-4)

    expected = bncpu.batch_norm_backward(dy, x, weight, running_mean, running_var, None, None,
                                         False, 1e-5)[0]
    _close(tensor(run("backward_inference", running_mean, running_var, dy), "diff_src"),
           expected)


def test_onednn_layer_norm_agrees_with_bncpu():
    _require_onednn()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((33, 70), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    weight, bias = rng.standard_normal((2, 70), dtype=np.float32)
    y, mean, rstd = bncpu.layer_norm_forward(x, (70,), weight, bias, 1e-5)
    forward = _onednn.layer_norm("forward_training", x, weight, bias)
    forward()
    _close(forward.buffers["dst"].reshape(x.shape), y)
    _close(forward.buffers["mean"], mean)
    dx, dweight, dbias = bncpu.layer_norm_backward(dy, x, (70,), mean, rstd, weight)
    backward = _onednn.layer_norm("backward", x, weight, bias, mean,
                                  1.0 / rstd.astype(np.float64) ** 2 - 1e-5, dy)
    backward()
    _close(backward.buffers["diff_src"].reshape(x.shape), dx)
    _close(backward.buffers["diff_scale"], dweight, 1e-4)
    _close(backward.buffers["diff_shift"], dbias, 1e-4)


def test_layouts_round_trip():
    x = np.arange(2 * 19 * 3 * 5, dtype=np.float32).reshape(2, 19, 3, 5)
    for layout in _onednn.LAYOUTS:
        buffer = _onednn.to_layout(x, layout)
        assert buffer.ctypes.data % 64 == 0
        np.testing.assert_array_equal(_onednn.from_layout(buffer, x.shape, layout), x)


def test_onednn_implementation_names_its_layout_or_says_why_not():
    case = next(case for case in _bench.cases() if case.id == "bn_fwd_eval-256x16x8x8-float32")
    inputs = _bench.Inputs(case)
    call = _bench.implementation_call(inputs, "onednn_best", 1)
    if _onednn.unavailable_reason() is not None:
        assert isinstance(call, _onednn.Unavailable)
        assert _bench.describe(call).startswith("n/a: ")
        return
    assert call.layout in _onednn.LAYOUTS
    stats_case = next(case for case in _bench.cases() if case.op == "bn_stats")
    missing = _bench.implementation_call(_bench.Inputs(stats_case), "onednn", 1)
    assert _bench.describe(missing).startswith("n/a: oneDNN 3.2 has no")


def test_measure_times_the_reference_apart():
    order = []

    def recorder(name):
        return lambda: order.append(name)

    calls = {name: recorder(name) for name in ("bncpu", "torch", "reference")}
    calls["floor"] = _bench.Unavailable("not here")
    budget = _bench.Budget(seconds=0.0, max_seconds=10.0, sample_seconds=0.0, min_rounds=4,
                           max_rounds=4, apart_samples=3, apart_seconds=10.0, once_seconds=1.0)
    timings = _bench.measure(calls, budget)
    timed = order[12:]   # after four calibration calls each
    assert timed == ["bncpu", "torch"] * 4 + ["reference"] * 3
    assert [len(timings[name].samples) for name in ("bncpu", "torch", "reference")] == [4, 4, 3]
    assert timings["floor"].status == "n/a: not here"


def test_ratios_compare_onednn_with_bncpu_into_out():
    medians = {"bncpu": 2.0, "bncpu_out": 1.0, "torch": 4.0, "onednn": 3.0, "floor": 1.0}
    found = _bench.ratios(medians)
    # one layout (no onednn_best timing): the oneDNN column is also the best one
    assert found == {"torch": 2.0, "onednn": 3.0, "onednn_best": 3.0, "floor": 2.0}
    medians.update(onednn_best=0.5, bncpu_bn=1.6)
    found = _bench.ratios(medians)
    assert found["onednn_best"] == 0.5 and found["bn_alone"] == 2.0 / 1.6


def test_report_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "report.json"
    assert report.main(["--quick", "--threads", "1", "--cases", "^bn_fwd_eval-256x120-",
                        "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "batch_norm fwd eval" in printed and "#3" not in printed and "#5" not in printed
    results = json.loads(path.read_text())["results"]
    assert [row["case"] for row in results] == ["bn_fwd_eval-256x120-float32"]
    implementations = results[0]["implementations"]
    assert implementations["bncpu"]["median_s"] > 0
    assert implementations["bncpu_out"]["median_s"] > 0


def test_every_registry_function_is_timed_or_says_why_not():
    assert _bench.untimed_functions() == []
    for case in _bench.cases():
        assert hasattr(bncpu, case.operation.function)


def test_measure_stops_at_max_seconds_after_three_rounds():
    import time

    calls = {"bncpu": lambda: time.sleep(0.01), "torch": lambda: time.sleep(0.01)}
    budget = _bench.Budget(seconds=0.0, max_seconds=0.0, sample_seconds=0.0, min_rounds=50,
                           max_rounds=50, apart_samples=1, apart_seconds=1.0, once_seconds=1.0)
    timings = _bench.measure(calls, budget)
    assert [len(timings[name].samples) for name in calls] == [3, 3]


def test_onednn_primitives_are_made_per_thread_count():
    # A oneDNN primitive keeps the thread count it was made with; the report makes a case's
    # inputs once for all its thread counts, so each count needs its own primitive.
    inputs = _bench.Inputs(_bench.cases(quick=True)[0])
    made = []

    def make():
        made.append(object())
        return made[-1]

    one = _bench._cached_primitive(inputs, "plain", 1, make)
    two = _bench._cached_primitive(inputs, "plain", 2, make)
    assert one is not two and len(made) == 2
    assert _bench._cached_primitive(inputs, "plain", 2, make) is two and len(made) == 2
