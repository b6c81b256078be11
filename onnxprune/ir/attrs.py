"""Node attributes, with defaults from the ONNX schema (never from memory)."""

from __future__ import annotations

import onnx


def attr_default(op_type: str, name: str, opset: int, domain: str = ""):
    """Attribute default from the ONNX schema, or None."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # noqa: BLE001 - unknown op or domain
        return None
    a = schema.attributes.get(name)
    if a is None or not a.default_value.name:
        return None
    return onnx.helper.get_attribute_value(a.default_value)


def get_attr(node: onnx.NodeProto, name: str, opset: int):
    """The node's attribute ``name``, else its schema default at ``opset``, else None."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return attr_default(node.op_type, name, opset, node.domain)


def attr(node: onnx.NodeProto, name: str, default=None):
    """The node's attribute ``name`` or ``default`` (for ops whose schema is not at hand)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
