"""The speed report's machinery (bncpu/bench/): its operations are the registry's, and
every peer computes what bncpu computes (so each column times the same work); the timing
harness keeps the reference out of the round-robin; every ratio reads "x faster than";
the table fits 120 columns and warns, top and bottom, when the machine was busy; and the
report runs end to end on a small case, as ``python -m bncpu``."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bncpu
from bncpu import _registry
from bncpu.bench import cases, frameworks, machine, onednn, peers, report, targets, timing
from conftest import CHILD_CWD


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
    reason = onednn.unavailable_reason()
    if reason is not None:
        pytest.skip(f"oneDNN harness not usable: {reason}")


def _close(actual, expected, tolerance=2e-5):
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("shape", [(4, 32, 5, 7), (3, 6, 4, 4), (2, 1, 3, 5), (16, 20)])
@pytest.mark.parametrize("layout", onednn.LAYOUTS)
def test_onednn_batch_norm_agrees_with_bncpu(shape, layout):
    _require_onednn()
    if len(shape) == 2 and layout != "plain":
        with pytest.raises(onednn.Unavailable, match="plain layout"):
            onednn.batch_norm("forward_training", np.zeros(shape, np.float32),
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
        primitive = onednn.batch_norm(kind, x, weight, bias, mean, var, grad, layout=layout)
        primitive()
        return primitive

    def tensor(primitive, name):
        return onednn.from_layout(primitive.buffers[name], shape, layout)

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
    forward = onednn.layer_norm("forward_training", x, weight, bias)
    forward()
    _close(forward.buffers["dst"].reshape(x.shape), y)
    _close(forward.buffers["mean"], mean)
    dx, dweight, dbias = bncpu.layer_norm_backward(dy, x, (70,), mean, rstd, weight)
    backward = onednn.layer_norm("backward", x, weight, bias, mean,
                                  1.0 / rstd.astype(np.float64) ** 2 - 1e-5, dy)
    backward()
    _close(backward.buffers["diff_src"].reshape(x.shape), dx)
    _close(backward.buffers["diff_scale"], dweight, 1e-4)
    _close(backward.buffers["diff_shift"], dbias, 1e-4)


def test_layouts_round_trip():
    x = np.arange(2 * 19 * 3 * 5, dtype=np.float32).reshape(2, 19, 3, 5)
    for layout in onednn.LAYOUTS:
        buffer = onednn.to_layout(x, layout)
        assert buffer.ctypes.data % 64 == 0
        np.testing.assert_array_equal(onednn.from_layout(buffer, x.shape, layout), x)


def test_onednn_implementation_names_its_layout_or_says_why_not():
    case = next(case for case in cases.cases() if case.id == "bn_fwd_eval-256x16x8x8-float32")
    call = peers.implementation_call(cases.Inputs(case), "onednn_best", 1)
    if onednn.unavailable_reason() is not None:
        assert isinstance(call, timing.Unavailable)
        assert timing.describe(call).startswith("n/a: ")
        return
    assert call.layout in onednn.LAYOUTS
    stats_case = next(case for case in cases.cases() if case.op == "bn_stats")
    missing = peers.implementation_call(cases.Inputs(stats_case), "onednn", 1)
    assert timing.describe(missing).startswith("n/a: oneDNN 3.2 has no")


def test_operations_are_the_registrys_timed_entries():
    timed = [(t.key, spec.name) for spec in _registry.FUNCTIONS.values() for t in spec.timed]
    assert [(key, op.function) for key, op in cases.OPERATIONS.items()] == timed
    assert cases.NOT_TIMED == {spec.name: spec.not_timed
                               for spec in _registry.FUNCTIONS.values() if spec.not_timed}
    # every operation has cases, and every registry function is timed or says why not;
    # the framework steps are the registry's batch-norm forward and backward, with cases
    # where their framework imports (tests/test_bench_keras_jax.py)
    steps = {key for key, op in cases.FRAMEWORK_OPERATIONS.items()
             if frameworks.missing(op.framework) is None}
    assert {case.op for case in cases.cases()} == set(cases.OPERATIONS) | steps
    assert {(op.spec.name, op.backward.name) for op in cases.FRAMEWORK_OPERATIONS.values()} == {
        ("batch_norm_forward", "batch_norm_backward")}
    assert cases.untimed_functions() == []


def test_the_registry_refuses_a_function_neither_timed_nor_explained():
    spec = _registry.FUNCTIONS["batch_norm_stats"]
    with pytest.raises(ValueError, match="batch_norm_stats: give the speed report"):
        dataclasses.replace(spec, timed=())
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(spec, not_timed="why")


def test_streams_and_writes_follow_the_registry():
    """The floor moves the bytes the registry's arguments say: the input-sized ones read,
    and one written where the function takes out=."""
    expected = {"bn_stats": (1, 0), "bn_bwd_reduce": (2, 0), "bn_bwd_train": (2, 1),
                "bnr_fwd_train": (1, 1), "bnar_fwd_train": (2, 1), "bnr_bwd_train": (3, 1),
                "ln_fwd": (1, 1), "rms_bwd": (2, 1)}
    for key, (reads, writes) in expected.items():
        operation = cases.OPERATIONS[key]
        assert (operation.reads, operation.writes) == (reads, writes), key


def _small_case(op, axis=1):
    family = cases.OPERATIONS[op].spec.family
    if family in ("layer_norm", "rms_norm"):
        return cases.Case(op, (6, 7, 16), "float32", (16,))
    shape = (4, 6, 5, 5) if axis == 1 else (4, 5, 5, 6)
    return cases.Case(op, shape, "float32", 3 if family == "group_norm" else None, axis=axis)


def _as_arrays(results, case):
    """Results as NumPy arrays; a torch tensor of channels-last data back in its layout."""
    if not isinstance(results, (tuple, list)):
        results = (results,)
    arrays = []
    for result in results:
        if result is not None and hasattr(result, "detach"):
            if case.axis == -1 and result.ndim == len(case.shape):
                result = result.movedim(1, -1)
            result = result.detach().numpy()
        arrays.append(result)
    return arrays


_SMALL_CASES = ([_small_case(op) for op in cases.OPERATIONS]
                + [_small_case(op, axis=-1) for op in ("bn_fwd_train", "bn_bwd_train",
                                                        "gn_fwd", "gn_bwd")])


@pytest.mark.parametrize("case", _SMALL_CASES, ids=[case.id for case in _SMALL_CASES])
def test_every_peer_computes_what_bncpu_computes(case, torch):
    """bncpu, bncpu into out=, the twin and torch on one case's inputs: the same results
    (torch's where it has a CPU kernel), so that every column times the same work."""
    inputs = cases.Inputs(case, seed=3)
    calls = peers.implementation_calls(inputs, 1)
    own = _as_arrays(calls["bncpu"](), case)
    for name in ("bncpu_out", "reference", "torch"):
        call = calls[name]
        if isinstance(call, timing.Unavailable):
            assert name != "reference"
            continue
        theirs = _as_arrays(call(), case)
        assert len(theirs) <= len(own), name
        for index, (mine, other) in enumerate(zip(own, theirs)):
            if other is None or np.size(other) == 0:
                continue
            np.testing.assert_allclose(np.reshape(other, np.shape(mine)), mine, rtol=2e-4,
                                       atol=2e-4, err_msg=f"{name} result {index}")


def test_the_fused_rows_time_the_batch_norm_they_extend():
    fused = peers.implementation_call(cases.Inputs(_small_case("bnr_bwd_train")), "bncpu_bn", 1)
    assert fused.func is bncpu.batch_norm_backward
    plain = peers.implementation_call(cases.Inputs(_small_case("bn_bwd_train")), "bncpu_bn", 1)
    assert isinstance(plain, timing.Unavailable)


def test_measure_times_the_reference_apart():
    order = []

    def recorder(name):
        return lambda: order.append(name)

    calls = {name: recorder(name) for name in ("bncpu", "torch", "reference")}
    calls["floor"] = timing.Unavailable("not here")
    budget = timing.Budget(seconds=0.0, max_seconds=10.0, sample_seconds=0.0, min_rounds=4,
                           max_rounds=4, apart_samples=3, apart_seconds=10.0, once_seconds=1.0)
    timings = timing.measure(calls, budget)
    timed = order[12:]   # after four calibration calls each
    assert timed == ["bncpu", "torch"] * 4 + ["reference"] * 3
    assert [len(timings[name].samples) for name in ("bncpu", "torch", "reference")] == [4, 4, 3]
    assert timings["floor"].status == "n/a: not here"


def test_measure_stops_at_max_seconds_after_three_rounds():
    import time

    calls = {"bncpu": lambda: time.sleep(0.01), "torch": lambda: time.sleep(0.01)}
    budget = timing.Budget(seconds=0.0, max_seconds=0.0, sample_seconds=0.0, min_rounds=50,
                           max_rounds=50, apart_samples=1, apart_seconds=1.0, once_seconds=1.0)
    timings = timing.measure(calls, budget)
    assert [len(timings[name].samples) for name in calls] == [3, 3]


def test_every_ratio_reads_times_faster_than():
    medians = {"bncpu": 2.0, "bncpu_out": 1.0, "torch": 4.0, "onednn": 3.0, "floor": 1.0}
    found = targets.ratios(medians)
    # one layout (no onednn_best timing): the oneDNN column is also the best one; oneDNN
    # is compared with bncpu into out=
    assert found == {"torch": 2.0, "onednn": 3.0, "onednn_best": 3.0, "floor": 0.5}
    medians.update(onednn_best=0.5, bncpu_bn=1.6)
    found = targets.ratios(medians)
    assert found["onednn_best"] == 0.5 and found["bn_alone"] == 1.6 / 2.0
    # a faster bncpu raises every ratio
    faster = targets.ratios(dict(medians, bncpu=1.0, bncpu_out=0.5))
    assert all(faster[name] > found[name] for name in found)


def test_every_target_is_a_lower_bound_on_a_ratio():
    for case in cases.cases():
        for n_threads in (1, 2):
            for target in targets.targets(case, n_threads):
                assert target.metric in targets.RATIOS
                assert targets.Target.parse(str(target)) == dataclasses.replace(
                    target, bound=float(f"{target.bound:.3g}"))
                assert target.met({target.metric: target.bound * 1.01})
                assert not target.met({target.metric: target.bound * 0.99})
    with pytest.raises(ValueError, match="Rerun it"):
        targets.Target.parse("floor<=2")


def _fake_rows(bncpu_seconds):
    """A row per case at 2 threads: every peer 1 ms, bncpu (and bncpu into out=) as given,
    oneDNN's best layout blocked (the widest cells)."""
    rows = []
    for case in cases.cases():
        timings = {name: timing.Timing(samples=[1e-3]) for name in peers.IMPLEMENTATIONS}
        for own in ("bncpu", "bncpu_out"):
            timings[own] = timing.Timing(samples=[bncpu_seconds])
        timings["onednn_best"].note = "nChw16c"
        rows.append(report.Row(case, 2, timings))
    return rows


def _env(share):
    env = report.environment()
    env.update(reuse_freed_memory=True, clock="wall clock", others_cpu_share=share,
               cpu="A Very Long Processor Name (TM) with Many Cores and a Frequency @ 3.10GHz",
               onednn="3.2.0")
    return env


def test_the_default_table_fits_120_columns_and_wide_has_every_column():
    slow = _fake_rows(1.0)   # every goal missed
    lines = report.header_lines(_env(0.5), [1, 2], quick=False) + report.table_lines(slow)
    assert max(len(line) for line in lines) <= report.WIDTH
    assert any("MISS torch,oneDNN,floor" in line for line in lines)
    wide = report.table_lines(slow, wide=True)
    assert max(len(line) for line in wide) > report.WIDTH
    for title in ("out=", "vs ref", "vs oneDNN best", "vs floor", "vs bn alone", "targets"):
        assert title in wide[0]
    assert "nChw16c" in "\n".join(wide) and "torch>=1:MISS(" in "\n".join(wide)
    fast = report.table_lines(_fake_rows(1e-6))
    assert max(len(line) for line in fast) <= report.WIDTH


def test_the_header_says_where_the_targets_come_from():
    header = report.header_lines(_env(0.0), [2], quick=True)
    start = next(i for i, line in enumerate(header) if line.startswith("  targets : "))
    text = " ".join(line.strip() for line in header[start:start + 2])
    assert text.startswith("targets : " + targets.SOURCE[:40])
    assert any("how many times faster bncpu is" in line for line in header)


def test_a_busy_machine_is_warned_of_at_the_top_and_the_bottom(tmp_path, capsys, monkeypatch):
    assert report.busy_lines(_env(0.05), [2]) == []
    assert report.busy_lines(_env(None), [2]) == []
    monkeypatch.setattr(machine, "others_share", lambda before, after: 0.4)
    assert report.main(["--quick", "--threads", "1", "--cases", "^bn_fwd_eval-256x120-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("WARNING: other processes used 40% of the CPUs")
    warning = report.busy_lines(_env(0.4), [1])
    assert lines[-len(warning):] == warning


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
    ratios = results[0]["ratios"]
    assert ratios["floor"] == pytest.approx(implementations["floor"]["median_s"]
                                            / implementations["bncpu"]["median_s"])


def test_python_m_bncpu_runs_the_report():
    root = os.path.dirname(os.path.dirname(bncpu.__file__))
    result = subprocess.run([sys.executable, "-m", "bncpu", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=CHILD_CWD,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr
    assert "--wide" in result.stdout and "--cases" in result.stdout
    from bncpu.bench import main
    assert main is report.main   # the console script bncpu-bench


def test_onednn_primitives_are_made_per_thread_count():
    # A oneDNN primitive keeps the thread count it was made with; the report makes a case's
    # inputs once for all its thread counts, so each count needs its own primitive.
    inputs = cases.Inputs(_small_case("bn_fwd_train"))
    made = []

    def make():
        made.append(object())
        return made[-1]

    one = peers.cached_primitive(inputs, "plain", 1, make)
    two = peers.cached_primitive(inputs, "plain", 2, make)
    assert one is not two and len(made) == 2
    assert peers.cached_primitive(inputs, "plain", 2, make) is two and len(made) == 2
