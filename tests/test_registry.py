"""The handler registry: module registration, duplicates, opset lookup, and test coverage of every
registered op type by the graphs of tests/test_handlers.py."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re

import onnxprune.handlers
import pytest
from onnxprune.handlers import MODULES, REGISTRY

from onnxprune.analysis.contract import DuplicateHandler, Handler, Registry
from onnxprune.ir import attrs

registered = REGISTRY.items
lookup = REGISTRY.lookup

HANDLER_TESTS = pathlib.Path(__file__).with_name("test_handlers.py")

# op types registered on purpose but not exercised by a graph in test_handlers.py, with the reason
NOT_TESTED = {
    ("", "Swish"): "no ONNX opset in the supported range 11..23 defines Swish (onnx has no schema for it)",
    ("", "Upsample"): "deprecated since opset 10; models below opset 11 are refused (MIN_OPSET = 11)",
}

_FAKE_DOMAIN = "test.onnxprune.registry"


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

    assert lookup("", "LayerNormalization", 16) is None  # since 17
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


# ----------------------------------------------------------------------------------------------
# every registered op type is exercised by a graph of test_handlers.py


def _node_pattern(domain: str, op: str) -> re.Pattern:
    """ONNX text node syntax: ``out = Op(...)``, ``out = Op<attrs>(...)`` or ``domain.Op(...)``."""
    prefix = re.escape(domain) + r"\." if domain else r"(?<![\w.])"
    return re.compile(prefix + re.escape(op) + r"\s*[<(]")


def test_every_registered_op_type_appears_in_a_handler_test_graph():
    text = HANDLER_TESTS.read_text()
    missing = []
    for (domain, op) in sorted(registered()):
        if (domain, op) in NOT_TESTED:
            continue
        if not _node_pattern(domain, op).search(text):
            missing.append(f"{domain + '::' if domain else ''}{op}")
    assert not missing, f"registered op types without a graph in test_handlers.py: {missing}"


def test_allow_list_is_short_and_current():
    regs = registered()
    assert len(NOT_TESTED) <= 5
    for key, reason in NOT_TESTED.items():
        assert key in regs, f"{key} is no longer registered: drop it from NOT_TESTED"
        assert reason
        # an allow-listed op must really be untested, else the entry is stale
        assert not _node_pattern(*key).search(HANDLER_TESTS.read_text()), key
