"""Checks for tests: prune and verify, run models with onnxruntime (through ``runtime.session``),
compare outputs by relative error, the assertions of an exact pruning result, and the standard tests
of a handler test module over its case lists (``CaseTests``).

Terms:
- *relative error* (``rel_err``): max |a - ref| / max |ref|, the measure verification uses; outputs are
  only ever compared this way, never with an absolute tolerance;
- *exact*: the pruned model computes what the masked original computes (relative error < ``TOL``);
- *kept indices*: the rows of an original weight (along an axis) that survive in the pruned one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import pipeline
from onnxprune.measure.verify import compare, masked_original, rel_error
from onnxprune.planning.options import PlanOptions
from onnxprune.runtime.inputs import make_inputs
from onnxprune.runtime.session import make_session
from onnxprune.testing import graphs

if TYPE_CHECKING:
    import pytest

TOL = 1e-4
# options of the approximate cases: attention channels pruned at their own ratio
APPROX_OPTS = {"allow_approximate": True, "head_dim_ratio": 0.5}


def prune_and_verify(model: onnx.ModelProto, ratio: float = 0.5, *, input_shapes=None, ep: str = "cpu",
                     tol: float = TOL, **plan_kwargs):
    """Prune ``model`` in memory and verify it against the masked original.

    Returns the pipeline ``Result`` (``.pruned``, ``.plan``, ``.verification``, ``.before``/``.after``).
    """
    return pipeline.run(model, PlanOptions(ratio=ratio, **plan_kwargs), input_shapes=input_shapes,
                        verify=True, ep=ep, tol=tol)


# ----------------------------------------------------------------------------------------------
# running and comparing


def run(model: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray], *,
        threads: int | None = None) -> list[np.ndarray]:
    """The outputs of ``model`` (a ModelProto or a path) on the CPU provider; feeds the model does not
    take are left out."""
    src = model if isinstance(model, onnx.ModelProto) else str(model)
    sess, _ = make_session(src, "cpu", threads=threads)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (inf when the shapes differ)."""
    return rel_error(a, ref)


def assert_close(a: np.ndarray, ref: np.ndarray, tol: float = TOL) -> None:
    """Same shape, relative error below ``tol``."""
    assert np.shape(a) == np.shape(ref), (np.shape(a), np.shape(ref))
    err = rel_err(a, ref)
    assert err < tol, f"relative error {err:.3e} >= {tol:.1e}"


def assert_same_output_shapes(original, pruned, feeds_list, finite: bool = True) -> None:
    """On every feed dict, ``pruned`` runs and gives the original's output shapes (and finite values)."""
    for feeds in feeds_list:
        for o, p in zip(run(original, feeds), run(pruned, feeds), strict=True):
            assert o.shape == p.shape, (o.shape, p.shape)
            if finite:
                assert np.all(np.isfinite(p))


def assert_report_verified(report: dict, tol: float = TOL) -> None:
    """A ``--report`` JSON says verification passed, every output below ``tol``."""
    v = report["verification"]
    assert v["passed"], v
    for o in v["outputs"]:
        assert o["rel_error"] < tol, o


def assert_matches_masked(res, feeds_list, tol: float = TOL) -> list[tuple[tuple[int, ...], float]]:
    """Verification passed and exact; full checker; the pruned model runs on every feed dict with the
    original's output shapes and equals the masked original there; MACs and parameters dropped.
    Returns (shape of the first feed, relative error) per output and feed."""
    v = res.verification
    assert v is not None and v.passed and v.exact, v.to_json()
    for o in v.outputs:
        assert o.rel_error < tol, (o.name, o.rel_error)
    js = res.to_json()["verification"]
    assert js["passed"] is True and js["exact"] is True
    onnx.checker.check_model(res.pruned, full_check=True)
    masked = masked_original(res.analysis.model, res.analysis.cg, res.plan)
    errors = []
    for feeds in feeds_list:
        outs_o = run(res.analysis.model, feeds)
        outs_m = run(masked, feeds)
        outs_p = run(res.pruned, feeds)
        for o, m, p in zip(outs_o, outs_m, outs_p, strict=True):
            assert p.shape == o.shape, (p.shape, o.shape, {k: x.shape for k, x in feeds.items()})
            assert np.isfinite(p).all()
            assert rel_err(p, m) < tol, ({k: x.shape for k, x in feeds.items()}, rel_err(p, m))
            errors.append((tuple(next(iter(feeds.values())).shape), rel_err(p, m)))
    assert res.after.macs < res.before.macs
    assert res.after.params < res.before.params
    return errors


# ----------------------------------------------------------------------------------------------
# reading models


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Initializer shapes by name (from the dims: external data is not read)."""
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def attr_of(model: onnx.ModelProto, op_type: str, name: str):
    """Attribute ``name`` of the first ``op_type`` node (None when absent)."""
    for n in model.graph.node:
        if n.op_type == op_type:
            for a in n.attribute:
                if a.name == name:
                    return onnx.helper.get_attribute_value(a)
    return None


def const_input(model: onnx.ModelProto, op_type: str, idx: int) -> np.ndarray:
    """The initializer feeding input ``idx`` of the first ``op_type`` node."""
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return inits(model)[node.input[idx]]


def kept_along(orig: np.ndarray, pruned: np.ndarray, axis: int) -> list[int]:
    """Indices of ``orig`` along ``axis`` that survive in ``pruned`` (matched by value)."""
    o = np.moveaxis(orig, axis, 0).reshape(orig.shape[axis], -1)
    p = np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1)
    out = []
    for row in p:
        hits = [i for i in range(len(o)) if np.array_equal(o[i], row)]
        assert len(hits) == 1, "ambiguous or missing row"
        out.append(hits[0])
    return out


def group_of(res_or_cg, const: str, axis: int):
    """The coupling group holding axis ``axis`` of constant ``const`` (of a Result or a CouplingGraph)."""
    cg = res_or_cg.analysis.cg if hasattr(res_or_cg, "analysis") else res_or_cg
    for g in cg.groups:
        if any(sl.const == const and sl.axis == axis for sl in g.slots):
            return g
    raise AssertionError(f"no group holds {const} axis {axis}")


def frozen_reasons(res_or_plan) -> list[str]:
    plan = res_or_plan.plan if hasattr(res_or_plan, "plan") else res_or_plan
    return [r for reasons in plan.frozen.values() for r in reasons]


# ----------------------------------------------------------------------------------------------
# the assertions of the handler tests


def check_shapes(model: onnx.ModelProto, expect: dict[str, tuple[int, ...]]) -> None:
    """``expect`` maps an initializer name, or ``"@T:i"`` (input i of the node producing tensor T,
    e.g. a weight reached through a folded Transpose/Cast), to its expected shape."""
    got = {k: tuple(v.shape) for k, v in inits(model).items()}
    inferred = None
    for key, shape in expect.items():
        if key.startswith("@"):
            out, idx = key[1:].rsplit(":", 1)
            node = next(n for n in model.graph.node if out in n.output)
            name = node.input[int(idx)]
            if name not in got:
                if inferred is None:
                    g = onnx.shape_inference.infer_shapes(model).graph
                    inferred = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
                                for vi in list(g.value_info) + list(g.output)}
                got[name] = inferred.get(name)
        else:
            name = key
        assert got.get(name) == tuple(shape), (key, got.get(name), shape)


def assert_exact(res, original: onnx.ModelProto, expect: dict[str, tuple[int, ...]] | None = None,
                 batch: int = 3, input_shapes=None) -> None:
    """The common assertions for an exact pruning result: verification passed (relative error <
    ``TOL``); the full checker passes; verified again at another batch size (the batch stays dynamic)
    with the original's output shapes and sane outputs; channels, MACs and parameters dropped; the
    initializer shapes are ``expect``."""
    v = res.verification
    assert v is not None and v.exact
    assert v.passed, v.to_json()
    assert v.outputs and all(o.rel_error < TOL for o in v.outputs), v.to_json()
    onnx.checker.check_model(res.pruned, full_check=True)
    # the batch axis stays dynamic: verify again at another batch size, and compare output shapes
    an = res.analysis
    if input_shapes is None:
        feeds = make_inputs(an.model, batch=batch, seed=1)
    else:
        feeds = make_inputs(an.model, input_shapes, seed=1)
    v2 = compare(an.model, masked_original(an.model, an.cg, res.plan), res.pruned, feeds, "cpu", TOL)
    assert v2.passed, v2.to_json()
    outs_o = run(original, feeds)
    outs_p = run(res.pruned, feeds)
    assert [o.shape for o in outs_p] == [o.shape for o in outs_o]
    for o in outs_o:  # a meaningful comparison: finite, non-constant outputs of sane magnitude
        assert np.all(np.isfinite(o)) and 1e-3 < np.ptp(o) and np.max(np.abs(o)) < 1e4
    assert [o.name for o in res.pruned.graph.output] == [o.name for o in original.graph.output]
    # channels were really removed
    assert res.plan.pruned(), "nothing was pruned"
    assert res.after.macs < res.before.macs
    assert res.after.params < res.before.params
    check_shapes(res.pruned, expect or {})


def assert_case_exact(case) -> None:
    """Build a ``graphs.Case``, prune it at its ratio and assert an exact result with its shapes."""
    model = case.model()
    res = prune_and_verify(model, case.ratio, input_shapes=case.input_shapes)
    assert_exact(res, model, case.expect)


def assert_verifies(model: onnx.ModelProto) -> None:
    """Pruned at 0.5, exact (the regression tests: a fix that freezes the faulty group and one that
    prunes it correctly both pass)."""
    res = prune_and_verify(model)
    assert_exact(res, model)


def assert_approximate_frozen(model: onnx.ModelProto, expect: dict, word: str) -> None:
    """By default the exact groups are pruned and verified; the approximate one is frozen with a
    reason naming ``word`` and the --allow-approximate option."""
    res = prune_and_verify(model)
    assert_exact(res, model, expect)
    approx_reasons = [r for r in frozen_reasons(res) if "approximate" in r]
    assert approx_reasons, frozen_reasons(res)
    assert all("--allow-approximate" in r for r in approx_reasons)
    assert any(word in r for r in approx_reasons), approx_reasons
    assert not any(gp.approximate for gp in res.plan.pruned())


def assert_approximate_allowed(model: onnx.ModelProto, expect: dict) -> None:
    """With ``APPROX_OPTS`` the approximate group is pruned; verification says it is not exact, the
    exact groups still verify, and the model keeps its output shapes at another batch size."""
    res = prune_and_verify(model, **APPROX_OPTS)
    assert any(gp.approximate for gp in res.plan.pruned())
    assert not any("approximate" in r for r in frozen_reasons(res))
    onnx.checker.check_model(res.pruned, full_check=True)
    check_shapes(res.pruned, expect)
    v = res.verification
    assert not v.exact and "approximate" in v.note
    assert v.passed  # the exact groups alone still verify against the masked original
    feeds = make_inputs(res.analysis.model, batch=2, seed=3)
    outs_o, outs_p = run(model, feeds), run(res.pruned, feeds)
    assert [o.shape for o in outs_p] == [o.shape for o in outs_o]
    assert all(np.all(np.isfinite(o)) for o in outs_p)
    assert res.after.macs < res.before.macs


def assert_prefixed_frozen(model: onnx.ModelProto, words: list[str], ignore: list[str] | None = None) -> None:
    """A ``graphs.prefixed_text`` model: the group of ``h`` (w1 out) is frozen, untouched, with a reason
    holding every word of ``words``; the w0 group is pruned exactly. ``ignore`` freezes by option."""
    res = prune_and_verify(model, **({"ignore": ignore} if ignore else {}))
    assert_exact(res, model, {"w0": (3, 3, 3, 3), "w1": (8, 3, 3, 3), "b1": (8,)})
    w2 = inits(model)["w2"]
    assert shapes_of(res.pruned)["w2"] == w2.shape
    g = group_of(res, "w1", 0)
    assert g.id in res.plan.frozen and g.id not in {gp.group for gp in res.plan.pruned()}
    assert g.prunable == bool(ignore)  # --ignore freezes in the plan, not in the analysis
    reasons = res.plan.frozen[g.id]
    assert any(all(w in r for w in words) for r in reasons), reasons
    # untouched means untouched: same values
    np.testing.assert_array_equal(inits(res.pruned)["b1"], inits(model)["b1"])


# ----------------------------------------------------------------------------------------------
# the command line as a subprocess


def run_cli(*args, cwd: str | os.PathLike | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m onnxprune.cli ARGS`` in a subprocess; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "onnxprune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# the standard tests of a handler test module (tests/handlers/)


def _ratio_params(module) -> tuple[list, list[str]]:
    """``RATIO_CASES`` (case id, ratio, expected shapes) with each case id replaced by its case (of
    ``CASES``, or of ``SANDWICHES`` as "sandwich-<id>")."""
    by_id = graphs.index(getattr(module, "CASES", ()), getattr(module, "SANDWICHES", ()))
    cases = module.RATIO_CASES
    return [(by_id[c], r, e) for c, r, e in cases], [f"{c}-{r}" for c, r, _ in cases]


def _listed(name: str, test_id: Callable[[Any], str]) -> Callable[[Any], tuple[list, list[str]]]:
    def params(module) -> tuple[list, list[str]]:
        cases = list(getattr(module, name))
        return cases, [test_id(c) for c in cases]

    return params


class CaseTests:
    """Base of the standard tests over the case lists of a handler test module. A test class of the
    module (``class TestConv(checks.GraphCases, checks.RatioCases)``) derives from the mixins of the
    lists the module has; pytest calls ``pytest_generate_tests`` on the class, which parametrizes each
    test method with the module's list that its one argument stands for (``_PARAMS``):

    - ``SANDWICHES`` and ``CASES``: ``graphs.Case``s (sandwiches, graphs written out in full), pruned at
      their ratio and exact with their shapes (``assert_case_exact``);
    - ``RATIO_CASES``: (case id, ratio, expected shapes), a case pruned at another ratio, exact;
    - ``APPROX_CASES``: (id, text, shapes by default, shapes with allow_approximate, word in the frozen
      reason), frozen by default and pruned only when allowed;
    - ``FROZEN_CASES``: (id, prefixed text, words in the frozen reason[, ``--ignore`` patterns]).

    Every graph routes a channel space through the op under test between a producer and a consumer
    weight (``graphs``); ``assert_exact`` asserts what an exact result must satisfy (verification,
    full checker, another batch size, shapes, MACs)."""

    _PARAMS: ClassVar[dict[str, Callable[[Any], tuple[list, list[str]]]]] = {
        "sandwich": _listed("SANDWICHES", lambda c: c.id),
        "case": _listed("CASES", lambda c: c.id),
        "ratio_case": _ratio_params,
        "approx_case": _listed("APPROX_CASES", lambda c: c[0]),
        "frozen_case": _listed("FROZEN_CASES", lambda c: c[0]),
    }

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        for arg, params in self._PARAMS.items():
            if arg in metafunc.fixturenames:
                values, ids = params(metafunc.module)
                metafunc.parametrize(arg, values, ids=ids)


class SandwichCases(CaseTests):
    def test_sandwich(self, sandwich: graphs.Case) -> None:
        assert_case_exact(sandwich)


class GraphCases(CaseTests):
    def test_graph(self, case: graphs.Case) -> None:
        assert_case_exact(case)


class RatioCases(CaseTests):
    def test_other_ratios(self, ratio_case: tuple[graphs.Case, float, dict]) -> None:
        case, ratio, expect = ratio_case
        model = case.model()
        res = prune_and_verify(model, ratio)
        assert_exact(res, model, expect)


class ApproxCases(CaseTests):
    def test_approximate_frozen_by_default(self, approx_case: tuple[str, str, dict, dict, str]) -> None:
        _id, text, default, _allowed, word = approx_case
        assert_approximate_frozen(graphs.build(text), default, word)

    def test_approximate_pruned_when_allowed(self, approx_case: tuple[str, str, dict, dict, str]) -> None:
        _id, text, _default, allowed, _word = approx_case
        assert_approximate_allowed(graphs.build(text), allowed)


class FrozenCases(CaseTests):
    def test_frozen_group(self, frozen_case: tuple[Any, ...]) -> None:
        _id, text, words, *ignore = frozen_case
        assert_prefixed_frozen(graphs.build(text), words, *ignore)


def one_line_error(proc, code: int = 2) -> str:
    """A command that failed as the CLI promises: exit ``code``, no traceback, one non-empty
    ``onnxprune: error:`` line on stderr (returned)."""
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnxprune: error:") and lines[0][len("onnxprune: error:"):].strip()
    return lines[0]


def save_in_src(tmp_path, model: onnx.ModelProto, name: str = "m.onnx"):
    """``model`` saved as ``tmp_path/src/name`` (a directory of its own); returns the path."""
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    p = d / name
    onnx.save(model, str(p))
    return p
