"""Handler registry, keyed by (domain, op_type, since_version).

A handler owns all knowledge of its op: how channels flow through it (``analyze``), how its
attributes and shape constants change (``rewrite``) and how much it computes (``macs``).
Handlers are stateless; lookup takes the greatest ``since`` <= the model's opset for the domain.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, ClassVar

import onnx

if TYPE_CHECKING:
    from onnxprune.coupling import AnalysisContext
    from onnxprune.rewrite import RewriteContext


class Handler:
    """Base class. Subclasses set ``op_types`` (and ``domain``, ``since``) and override methods."""

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    since: ClassVar[int] = 1

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        """Fix attributes and shape constants after the channels changed. Default: nothing to fix."""

    def macs(self, node: onnx.NodeProto, shape_of, const_of) -> int:
        return 0


_REGISTRY: dict[tuple[str, str], list[tuple[int, Handler]]] = defaultdict(list)


class DuplicateHandler(Exception):
    pass


def register(cls: type[Handler]) -> type[Handler]:
    """Class decorator: register one instance for each op type at its ``since`` version."""
    inst = cls()
    for op in cls.op_types:
        key = (_norm_domain(cls.domain), op)
        if any(since == cls.since for since, _ in _REGISTRY[key]):
            raise DuplicateHandler(f"handler for {key} since {cls.since} registered twice")
        _REGISTRY[key].append((cls.since, inst))
        _REGISTRY[key].sort(key=lambda x: x[0])
    return cls


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def lookup(domain: str, op_type: str, opset: int) -> Handler | None:
    entries = _REGISTRY.get((_norm_domain(domain), op_type))
    if not entries:
        return None
    best = None
    for since, inst in entries:
        if since <= opset:
            best = inst
    return best


def registered() -> dict[tuple[str, str], list[tuple[int, Handler]]]:
    return dict(_REGISTRY)


def attr_default(op_type: str, name: str, opset: int, domain: str = ""):
    """Attribute default from the ONNX schema, never from memory."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # noqa: BLE001
        return None
    a = schema.attributes.get(name)
    if a is None or not a.default_value.name:
        return None
    return onnx.helper.get_attribute_value(a.default_value)


def get_attr(node: onnx.NodeProto, name: str, opset: int):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return attr_default(node.op_type, name, opset, node.domain)
