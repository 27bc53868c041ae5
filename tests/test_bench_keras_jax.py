"""The speed report's Keras and JAX rows (bncpu/bench/frameworks.py): present exactly when
jax (and, for the Keras row, Keras on the jax backend) imports, each side computing the
same training step, bncpu's matching the NumPy API, and the rows' own table fitting the
report's width."""
import json
import sys

import numpy as np
import pytest

import bncpu
from bncpu.bench import cases, frameworks, peers, report, targets, timing
from test_bench import _default_threads  # noqa: F401  (autouse: restores bncpu's and torch's threads)

STEPS = ("jax_bn_step", "keras_bn_step")


def _require(framework):
    reason = frameworks.missing(framework)
    if reason is not None:
        pytest.skip(f"{framework} rows not available here: {reason}")


def _step_case(op):
    return cases.Case(op, (4, 5, 5, 6), "float32", axis=-1)


def _leaves(result):
    import jax
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(result)]


def test_the_rows_are_in_the_report_when_the_frameworks_import():
    _require("keras")
    found = [case for case in cases.cases(quick=True) if case.op in STEPS]
    assert [case.op for case in found] == list(STEPS)
    for case in found:
        assert (case.shape, case.dtype, case.axis) == (cases.CHANNELS_LAST_BN, "float32", -1)
        # forward reads x, writes y; backward reads dy and x, writes dx
        assert (case.operation.reads, case.operation.writes) == (3, 2)
    keras_case = found[1]
    assert [str(t) for t in targets.targets(keras_case, 2)] == ["stock>=2"]
    assert targets.targets(keras_case, 1) == [] and targets.targets(found[0], 2) == []


@pytest.mark.parametrize("blocked", ["jax", "keras"])
def test_the_rows_are_absent_when_an_import_fails(monkeypatch, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)   # `import <blocked>` raises ImportError
    expected = {"jax": [], "keras": ["jax_bn_step"]}[blocked]
    if blocked == "keras" and frameworks.missing("jax") is not None:
        expected = []
    ops = [case.op for case in cases.cases(quick=True) if case.op in STEPS]
    assert ops == expected
    call = peers.implementation_call(cases.Inputs(_step_case("keras_bn_step")), "bncpu", 1)
    assert isinstance(call, timing.Unavailable) and blocked in str(call)


def test_keras_on_another_backend_gets_no_keras_row(monkeypatch):
    _require("keras")
    keras = sys.modules["keras"]
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    assert frameworks.missing("keras") == "Keras already runs the torch backend in this process"
    assert [case.op for case in cases.cases(quick=True) if case.op in STEPS] == ["jax_bn_step"]


def test_the_jax_step_computes_what_the_numpy_api_and_xla_compute():
    _require("jax")
    case = _step_case("jax_bn_step")
    inputs = cases.Inputs(case, seed=3)
    calls = peers.implementation_calls(inputs, 1)
    assert {name for name, call in calls.items() if not isinstance(call, Exception)} == {
        "bncpu", "stock"}
    assert isinstance(calls["torch"], timing.Unavailable)
    (dx, dw, db), (new_mean, new_var) = calls["bncpu"]()
    (sdx, sdw, sdb), (s_mean, s_var) = calls["stock"]()
    for ours, theirs in ((dx, sdx), (dw, sdw), (db, sdb), (new_mean, s_mean), (new_var, s_var)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=2e-4, atol=2e-4)

    args, dy = inputs.args, inputs.grad_output
    mean, var = args["running_mean"].copy(), args["running_var"].copy()
    _, save_mean, save_invstd = bncpu.batch_norm_forward(
        args["input"], args["weight"], args["bias"], mean, var, True, args["momentum"],
        args["eps"], axis=-1)
    expected = bncpu.batch_norm_backward(dy, args["input"], args["weight"], None, None,
                                         save_mean, save_invstd, True, args["eps"], axis=-1)
    for ours, theirs in zip((dx, dw, db, new_mean, new_var), (*expected, mean, var)):
        np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_the_keras_step_computes_what_keras_computes():
    _require("keras")
    inputs = cases.Inputs(_step_case("keras_bn_step"), seed=3)
    calls = peers.implementation_calls(inputs, 1)
    ours, theirs = _leaves(calls["bncpu"]()), _leaves(calls["stock"]())
    # gradients for gamma, beta and x, then the new moving mean and variance
    assert [leaf.shape for leaf in ours] == [(6,), (6,), (4, 5, 5, 6), (6,), (6,)]
    assert [leaf.shape for leaf in theirs] == [leaf.shape for leaf in ours]
    for index, (mine, other) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(mine, other, rtol=2e-4, atol=2e-4, err_msg=f"leaf {index}")
    assert not np.allclose(ours[3], inputs.args["running_mean"])   # a training step


def test_the_framework_table_fits_and_names_what_it_compares():
    _require("keras")
    rows = []
    for op in STEPS:
        case = cases.Case(op, cases.CHANNELS_LAST_BN, "float32", axis=-1)
        timings = {name: timing.Timing(samples=[1e-3]) for name in peers.IMPLEMENTATIONS}
        timings["bncpu"] = timing.Timing(samples=[1.0])
        rows.append(report.Row(case, 2, timings))
    env = report.environment()
    lines = report.framework_lines(env, rows)
    assert max(len(line) for line in lines) <= report.WIDTH
    text = "\n".join(lines)
    for name in frameworks.STOCK.values():
        assert name in text
    assert "MISS stock" in text and "XLA" in text
    wide = "\n".join(report.framework_lines(env, rows, wide=True))
    assert "stock>=2:MISS(0.001)" in wide
    assert report.framework_lines(env, []) == []


def test_report_times_the_jax_row(tmp_path, capsys):
    _require("jax")
    path = tmp_path / "report.json"
    assert report.main(["--quick", "--threads", "1", "--cases", "^jax_bn_step-",
                        "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "bncpu.jax batch_norm fwd+bwd" in printed and "jnp batch norm (XLA)" in printed
    data = json.loads(path.read_text())
    assert data["environment"]["frameworks"]["jax"]
    (row,) = data["results"]
    implementations = row["implementations"]
    assert row["ratios"]["stock"] == pytest.approx(implementations["stock"]["median_s"]
                                                   / implementations["bncpu"]["median_s"])
    assert implementations["torch"]["status"].startswith("n/a")


def test_the_rows_are_not_timed_on_the_calling_threads_cpu_clock(monkeypatch):
    _require("jax")
    monkeypatch.setattr(timing, "clock", timing.time.thread_time)
    call = peers.implementation_call(cases.Inputs(_step_case("jax_bn_step")), "bncpu", 1)
    assert isinstance(call, timing.Unavailable) and "--cpu-clock" in str(call)
