"""The handler registry: module registration, duplicates, ``since`` checked against onnx's schemas,
opset lookup, facts-only handlers staying barriers, and test coverage of every registered op type
by the graphs of the handler tests (tests/handlers/)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import pkgutil
import re

import onnx
import onnxprune.handlers
import pytest
from onnxprune.handlers import MODULES, REGISTRY

from onnxprune import pipeline
from onnxprune.analysis.contract import (
    ORT_DEFAULT_DOMAIN_OPS,
    AnalysisCtx,
    DuplicateHandler,
    Handler,
    InvalidSince,
    Registry,
    RewriteCtx,
    check_since,
    schema_versions,
)
from onnxprune.analysis.coupling import AnalysisContext
from onnxprune.ir import attrs
from onnxprune.measure.stats import stats_at
from onnxprune.rewrite.apply import RewriteContext
from onnxprune.testing import from_text

registered = REGISTRY.items
lookup = REGISTRY.lookup

_TESTS = pathlib.Path(__file__).parent


def handler_test_text() -> str:
    """The text of every handler test module (tests/handlers/, and tests/test_handlers.py if any)."""
    files = sorted((_TESTS / "handlers").glob("test_*.py")) + sorted(_TESTS.glob("test_handlers.py"))
    assert files, "no handler tests found"
    return "\n".join(f.read_text() for f in files)


def _channel_entries() -> list[tuple[str, str]]:
    """Registered op types with at least one handler that follows channels."""
    return sorted(k for k, entries in registered().items() if any(inst.follows_channels for _, inst in entries))


# op types registered on purpose but not exercised by a graph in the handler tests, with the reason
NOT_TESTED = {
    ("", "Swish"): "no ONNX opset in the supported range 11..23 defines Swish (onnx has no schema for it)",
    ("", "Upsample"): "deprecated since opset 10; models below opset 11 are converted to opset 13 on analysis "
                      "(analysis.passes.convert_opset), where it is Resize",
}

_FAKE_DOMAIN = "test.onnxprune.registry"


def _all_handler_classes() -> list[type[Handler]]:
    regs = registered()
    return sorted({type(inst) for entries in regs.values() for _, inst in entries}, key=lambda c: c.__qualname__)


@pytest.fixture
def scratch_registry():
    """A registry of every real handler that a test may add to (the real one is never touched)."""
    return Registry.of_modules([getattr(onnxprune.handlers, m) for m in MODULES])


def _handler_classes(module) -> list[type[Handler]]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Handler) and c is not Handler and c.__module__ == module.__name__ and c.op_types]


# ----------------------------------------------------------------------------------------------
# modules


def test_modules_list_is_every_handler_module():
    on_disk = {m.name for m in pkgutil.iter_modules(onnxprune.handlers.__path__)}
    assert set(MODULES) == on_disk
    assert len(MODULES) == len(set(MODULES))


@pytest.mark.parametrize("name", MODULES)
def test_every_module_is_imported_and_registers_handlers(name):
    module = importlib.import_module(f"onnxprune.handlers.{name}")
    assert getattr(onnxprune.handlers, name) is module  # imported by the package itself
    regs = registered()
    instances = {type(inst) for entries in regs.values() for _, inst in entries}
    classes = _handler_classes(module)
    registered_here = [c for c in classes if c in instances]
    assert registered_here, f"module {name} registers no handler"
    for cls in registered_here:
        dom = "" if cls.domain in ("", "ai.onnx") else cls.domain
        for op in cls.op_types:
            assert any(type(inst) is cls and since == cls.since for since, inst in regs[(dom, op)]), (cls, op)


def test_registered_entries_are_sorted_handlers():
    regs = registered()
    assert len(regs) > 50
    for key, entries in regs.items():
        assert entries, key
        sinces = [s for s, _ in entries]
        assert sinces == sorted(sinces) and len(set(sinces)) == len(sinces), key
        assert all(isinstance(inst, Handler) for _, inst in entries)


# ----------------------------------------------------------------------------------------------
# duplicates


def test_duplicate_registration_raises(scratch_registry):
    class AnotherConv(Handler):
        op_types = ("Conv",)

    before = list(scratch_registry.items()[("", "Conv")])
    with pytest.raises(DuplicateHandler):
        scratch_registry.add(AnotherConv)
    assert scratch_registry.items()[("", "Conv")] == before


def test_duplicate_in_ai_onnx_alias_raises(scratch_registry):
    class AliasRelu(Handler):
        op_types = ("Relu",)
        domain = "ai.onnx"

    with pytest.raises(DuplicateHandler):
        scratch_registry.add(AliasRelu)


def test_duplicate_in_custom_domain_raises_and_other_since_is_fine(scratch_registry):
    class Probe1(Handler):
        op_types = ("Probe",)
        domain = _FAKE_DOMAIN

    class Probe1Again(Handler):
        op_types = ("Probe",)
        domain = _FAKE_DOMAIN

    class Probe2(Handler):
        op_types = ("Probe",)
        domain = _FAKE_DOMAIN
        since = 2

    scratch_registry.add(Probe1)
    with pytest.raises(DuplicateHandler):
        scratch_registry.add(Probe1Again)
    scratch_registry.add(Probe2)  # another since-version of the same op is not a duplicate
    assert [s for s, _ in scratch_registry.items()[(_FAKE_DOMAIN, "Probe")]] == [1, 2]


# ----------------------------------------------------------------------------------------------
# since: where the op's spec changed


@pytest.mark.parametrize("cls", _all_handler_classes(), ids=lambda c: c.__name__)
def test_every_real_handler_since_is_a_schema_version(cls):
    check_since(cls)  # raises InvalidSince otherwise
    if cls.domain in ("", "ai.onnx"):
        for op in cls.op_types:
            if ("", op) in ORT_DEFAULT_DOMAIN_OPS:  # onnxruntime's own schema, version 1
                assert cls.since == 1 and ("", op) not in schema_versions()
                continue
            versions = schema_versions()[("", op)]
            assert cls.since <= versions[0] or onnx.defs.get_schema(op, cls.since).since_version == cls.since


def test_version_classes_start_where_the_schema_changed():
    """A class with since > 1 sits exactly on a schema version (the rule's meaningful half)."""
    later = [c for c in _all_handler_classes() if c.domain in ("", "ai.onnx") and c.since > 1]
    assert len(later) >= 10  # Split13, Softmax13, Shape15, Pad18, Reduce18, Squeeze13, ...
    for cls in later:
        for op in cls.op_types:
            first = schema_versions()[("", op)][0]
            assert cls.since == first or onnx.defs.get_schema(op, cls.since).since_version == cls.since, (cls, op)


def test_wrong_since_is_refused(scratch_registry):
    class Softmax12(Handler):  # Softmax changed at 11 and 13, not at 12
        op_types = ("Softmax",)
        since = 12

    before = scratch_registry.items()[("", "Softmax")]
    with pytest.raises(InvalidSince, match="Softmax did not change at opset 12"):
        scratch_registry.add(Softmax12)
    assert scratch_registry.items()[("", "Softmax")] == before


def test_since_of_every_op_type_is_checked(scratch_registry):
    class MixedSince(Handler):  # Relu changed at 13, Elu did not (versions 1, 6, 22)
        op_types = ("Relu", "Elu")
        since = 13

    with pytest.raises(InvalidSince, match="Elu did not change at opset 13"):
        scratch_registry.add(MixedSince)
    assert ("", "Relu") in scratch_registry.items()
    assert all(since != 13 for since, _ in scratch_registry.items()[("", "Relu")])


@pytest.mark.parametrize("since", [0, -1])
def test_since_below_one_is_refused(scratch_registry, since):
    cls = type("Probe", (Handler,), {"op_types": ("Probe",), "domain": _FAKE_DOMAIN, "since": since})
    with pytest.raises(InvalidSince):
        scratch_registry.add(cls)


def test_unknown_default_domain_op_is_refused(scratch_registry):
    class NotAnOp(Handler):
        op_types = ("NoSuchOnnxOp",)

    with pytest.raises(InvalidSince, match="defines no op NoSuchOnnxOp"):
        scratch_registry.add(NotAnOp)


def test_since_up_to_the_first_schema_version_means_from_the_start(scratch_registry):
    class GroupNorm1(Handler):  # GroupNormalization's first schema is 18: since 1 = "from the start"
        op_types = ("GroupNormalization",)
        since = 1

    scratch_registry.add(GroupNorm1)


# ----------------------------------------------------------------------------------------------
# what handlers see: the Protocols, implemented by the contexts, and nothing else


def _protocol_members(proto) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")}


@pytest.mark.parametrize(("proto", "impl"), [(AnalysisCtx, AnalysisContext), (RewriteCtx, RewriteContext)],
                         ids=["analysis", "rewrite"])
def test_contexts_implement_their_protocol(proto, impl):
    members = _protocol_members(proto)
    assert members
    for name in sorted(members):
        assert hasattr(impl, name), f"{impl.__name__} lacks {name}"
        want, got = getattr(proto, name), getattr(impl, name)
        if callable(want) and not isinstance(want, property):
            assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name


def test_handlers_see_only_the_protocols():
    """Every ``ctx.<name>`` / ``rw.<name>`` in a handler module is a member of its Protocol (no
    reaching into the coupling graph)."""
    allowed = {"ctx": _protocol_members(AnalysisCtx), "rw": _protocol_members(RewriteCtx)}
    both = allowed["ctx"] & allowed["rw"]  # helpers that take either context (rnn's zero-state trace)
    seen = set()
    for mod in MODULES:
        path = pathlib.Path(importlib.import_module(f"onnxprune.handlers.{mod}").__file__)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in allowed:
                seen.add(node.attr)
                assert node.attr in allowed[node.value.id] | both, f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}"
    assert {"identity", "slot", "producer", "consumers", "handler_of", "old_shape", "new_shape"} <= seen


# ----------------------------------------------------------------------------------------------
# lookup


def test_lookup_picks_greatest_since_not_above_opset(scratch_registry):
    made = {}
    for since in (9, 1, 5):  # registered out of order
        cls = type(f"P{since}", (Handler,), {"op_types": ("Versioned",), "domain": _FAKE_DOMAIN, "since": since})
        scratch_registry.add(cls)
        made[since] = cls
    look = scratch_registry.lookup
    assert look(_FAKE_DOMAIN, "Versioned", 0) is None
    for opset, want in [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (23, 9)]:
        assert type(look(_FAKE_DOMAIN, "Versioned", opset)) is made[want], opset
    assert look(_FAKE_DOMAIN, "Unknown", 23) is None
    assert look("", "Versioned", 23) is None  # domains are separate
    assert lookup(_FAKE_DOMAIN, "Versioned", 23) is None  # the real registry is untouched


def test_lookup_of_real_handlers():
    from onnxprune.handlers import concat, conv, norm

    # since 17; below, only facts (onnxruntime's contrib op of the same name is a barrier)
    assert type(lookup("", "LayerNormalization", 16)) is norm.LayerNormalization1
    assert not lookup("", "LayerNormalization", 16).follows_channels
    assert isinstance(lookup("", "LayerNormalization", 17), norm.LayerNormalization)
    assert lookup("", "Slice", 9) is None  # since 10
    assert isinstance(lookup("", "Slice", 11), concat.Slice)
    assert isinstance(lookup("ai.onnx", "Conv", 11), conv.Conv)  # ai.onnx is the default domain
    assert lookup("", "NoSuchOp", 17) is None
    assert lookup("com.example", "Conv", 1) is None


def test_attribute_defaults_come_from_the_schema():
    import onnx

    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    assert attrs.get_attr(node, "group", 17) == 1
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], group=4)
    assert attrs.get_attr(node, "group", 17) == 4
    assert attrs.attr_default("Softmax", "axis", 11) == 1
    assert attrs.attr_default("Softmax", "axis", 13) == -1
    assert attrs.attr_default("NoSuchOp", "axis", 13) is None


def test_version_classes_are_picked_by_opset():
    from onnxprune.handlers import concat, norm, pool, reshape, resize, shapeops

    assert isinstance(lookup("", "Softmax", 12), norm.Softmax1) and not isinstance(lookup("", "Softmax", 12),
                                                                                    norm.Softmax13)
    assert isinstance(lookup("", "Softmax", 13), norm.Softmax13)
    assert type(lookup("", "Split", 12)) is concat.Split1 and type(lookup("", "Split", 18)) is concat.Split13
    assert type(lookup("", "ReduceSum", 12)) is pool.ReduceSum1 and type(lookup("", "ReduceSum", 13)) is pool.ReduceSum13
    assert type(lookup("", "ReduceMean", 17)) is pool.Reduce1 and type(lookup("", "ReduceMean", 18)) is pool.Reduce18
    assert type(lookup("", "Squeeze", 12)) is reshape.Squeeze1 and type(lookup("", "Squeeze", 13)) is reshape.Squeeze13
    assert type(lookup("", "Shape", 14)) is shapeops.Shape1 and type(lookup("", "Shape", 15)) is shapeops.Shape15
    assert type(lookup("", "Size", 15)) is shapeops.Shape1  # Size has no start/end
    assert type(lookup("", "Pad", 17)) is resize.Pad11 and type(lookup("", "Pad", 23)) is resize.Pad18


# ----------------------------------------------------------------------------------------------
# facts-only handlers (follows_channels = False) are barriers, reported as unknown ops

# one graph per facts-only op: the op reads the channels of a weight-producing op (tensor "h")
FACTS_ONLY_GRAPHS = {
    "Einsum": """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y)
<float[8,3,3,3] w1, float[4,8,1,1] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  m = Einsum<equation="nchw,nchw->nchw">(h, h)
  y = Conv(m, w2)
}""",
    "GroupNormalization": """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y)
<float[8,3,3,3] w1, float[2] s, float[2] b, float[4,8,1,1] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  m = GroupNormalization<num_groups=2>(h, s, b)
  y = Conv(m, w2)
}""",
    "OneHot": """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y)
<float[8,3,3,3] w1, float[1] d = {2}, float[2] v = {0, 1}, float[4,8,1,1] w2>
{
  h = Conv<pads=[1,1,1,1]>(x, w1)
  o = OneHot<axis=-1>(h, d, v)
  m = ReduceMax<axes=[4], keepdims=0>(o)
  y = Conv(m, w2)
}""",
    "Attention": """
<ir_version: 10, opset_import: ["" : 23]>
g (float[1,10,16] x) => (float[1,10,16] y)
<float[16,16] wq, float[16,16] wk, float[16,16] wv, float[16,16] wo>
{
  h = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  m = Attention<q_num_heads=2, kv_num_heads=2>(h, k, v)
  y = MatMul(m, wo)
}""",
}


def test_every_facts_only_handler_has_a_barrier_graph():
    facts_only = sorted(op for (d, op), entries in registered().items()
                        if d == "" and not any(inst.follows_channels for _, inst in entries))
    assert facts_only == sorted(FACTS_ONLY_GRAPHS)


@pytest.mark.parametrize("op", sorted(FACTS_ONLY_GRAPHS))
def test_facts_only_handler_is_a_barrier(op):
    """The op has a handler (MACs, counts, shape facts), yet the analysis treats it as unknown: it
    is listed as not understood and every channel it touches is frozen with that reason."""
    model = from_text(FACTS_ONLY_GRAPHS[op])
    node = next(n for n in model.graph.node if n.op_type == op)
    assert REGISTRY.for_node(node, 23) is not None
    cg = pipeline.analyze_model(model).cg
    assert list(cg.unknown_ops) == [op]
    reason = f"unknown op {op} ('{node.name}')" if node.name else f"unknown op {op} ("
    sid = cg.space_ids[("h", len(cg.shapes.get("h")) - 1 if op == "Attention" else 1)]
    assert any(reason in r for _, r in cg.frozen[sid]), cg.frozen[sid]
    g = next(g for g in cg.groups if sid in g.spaces)
    assert not g.prunable and any(f"unknown op {op}" in r for r in g.frozen)


def test_layer_normalization_below_17_is_a_barrier_that_torch_pruning_counts():
    """onnxruntime's optimizer writes its contrib LayerNormalization in the default domain at any
    opset: below 17 it is not followed (unknown op), yet counted 2 per input element."""
    text = """
<ir_version: 8, opset_import: ["" : 16]>
g (float[1,10,16] x) => (float[1,10,8] y)
<float[16,16] w1, float[16] s, float[16] b, float[16,8] w2>
{
  h = MatMul(x, w1)
  m = LayerNormalization<axis=-1>(h, s, b)
  y = MatMul(m, w2)
}"""
    model = from_text(text)
    cg = pipeline.analyze_model(model).cg
    assert list(cg.unknown_ops) == ["LayerNormalization"]
    assert not any(g.prunable for g in cg.groups)
    assert stats_at(model).tp_ops == 10 * 16 * 16 + 10 * 16 * 8 + 2 * 10 * 16


# ----------------------------------------------------------------------------------------------
# every registered op type (with a channel handler) is exercised by a graph of the handler tests


def _node_pattern(domain: str, op: str) -> re.Pattern:
    """ONNX text node syntax: ``out = Op(...)``, ``out = Op<attrs>(...)`` or ``domain.Op(...)``."""
    prefix = re.escape(domain) + r"\." if domain else r"(?<![\w.])"
    return re.compile(prefix + re.escape(op) + r"\s*[<(]")


def test_every_registered_op_type_appears_in_a_handler_test_graph():
    text = handler_test_text()
    missing = []
    for (domain, op) in _channel_entries():
        if (domain, op) in NOT_TESTED:
            continue
        if not _node_pattern(domain, op).search(text):
            missing.append(f"{domain + '::' if domain else ''}{op}")
    assert not missing, f"registered op types without a graph in the handler tests: {missing}"


def test_allow_list_is_short_and_current():
    regs = registered()
    assert len(NOT_TESTED) <= 5
    for key, reason in NOT_TESTED.items():
        assert key in regs, f"{key} is no longer registered: drop it from NOT_TESTED"
        assert reason
        # an allow-listed op must really be untested, else the entry is stale
        assert not _node_pattern(*key).search(handler_test_text()), key
