"""The handler contract: what a handler is, what it may see, and how handlers are registered.

A handler owns all knowledge of its op: how channels flow through it (``analyze``), how its
attributes and shape constants change (``rewrite``) and how much it computes (``macs``). Handlers
are stateless; a :class:`Registry` holds one instance per ``(domain, op_type, since)`` and looks
up the greatest ``since`` <= the model's opset for the domain. The registry is built from an
explicit list of handler modules (``onnxprune.handlers.REGISTRY``) and passed to the analysis by
its caller.
"""

from __future__ import annotations

import types
from collections import defaultdict
from enum import Enum
from typing import ClassVar, Protocol

import onnx


class Role(str, Enum):
    """What a weight axis is to the channels of its space.

    PRODUCER: writes the channels (conv filters); CONSUMER: reads them (input-channel axis: zeroed in
    the masked original); SCALE: multiplies them (BatchNorm gamma); PARAM: is added or applied per
    channel (biases); STAT: statistics per channel (running mean and variance).
    """

    PRODUCER = "producer"
    CONSUMER = "consumer"
    SCALE = "scale"
    PARAM = "param"
    STAT = "stat"

    def __str__(self) -> str:
        return self.value


class AnalysisCtx(Protocol):
    """What a handler sees while analysing one node (implemented by ``coupling.AnalysisContext``)."""


class RewriteCtx(Protocol):
    """What a handler sees while fixing one node (implemented by ``rewrite.apply.RewriteContext``)."""


class Handler:
    """Base class. Subclasses set ``op_types`` (and ``domain``, ``since``) and override methods."""

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    since: ClassVar[int] = 1

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisCtx) -> None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, rw: RewriteCtx) -> None:
        """Fix attributes and shape constants after the channels changed. Default: nothing to fix."""

    def macs(self, node: onnx.NodeProto, shape_of, const_of) -> int:
        return 0


class DuplicateHandler(Exception):  # noqa: N818
    pass


def register(cls: type[Handler]) -> type[Handler]:
    """Class decorator: marks a handler class for :meth:`Registry.of_modules` (which registers it
    under every op type it lists, at its ``since``)."""
    cls._registered = True
    return cls


def norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


class Registry:
    """Handlers by ``(domain, op_type)``, each list sorted by ``since``."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[tuple[int, Handler]]] = defaultdict(list)

    @classmethod
    def of_modules(cls, modules: list[types.ModuleType]) -> Registry:
        """Register every class marked with :func:`register` that a module defines (not imports)."""
        reg = cls()
        for mod in modules:
            for obj in vars(mod).values():
                if (isinstance(obj, type) and issubclass(obj, Handler) and obj.__dict__.get("_registered")
                        and obj.__module__ == mod.__name__):
                    reg.add(obj)
        return reg

    def add(self, handler: type[Handler]) -> type[Handler]:
        inst = handler()
        for op in handler.op_types:
            key = (norm_domain(handler.domain), op)
            if any(since == handler.since for since, _ in self._entries[key]):
                raise DuplicateHandler(f"handler for {key} since {handler.since} registered twice")
            self._entries[key].append((handler.since, inst))
            self._entries[key].sort(key=lambda x: x[0])
        return handler

    def lookup(self, domain: str, op_type: str, opset: int) -> Handler | None:
        entries = self._entries.get((norm_domain(domain), op_type))
        if not entries:
            return None
        best = None
        for since, inst in entries:
            if since <= opset:
                best = inst
        return best

    def for_node(self, node: onnx.NodeProto, opset: int) -> Handler | None:
        """The handler of ``node`` in a model of default-domain ``opset`` (other domains: version 1)."""
        domain = norm_domain(node.domain)
        return self.lookup(domain, node.op_type, opset if domain == "" else 1)

    def items(self) -> dict[tuple[str, str], list[tuple[int, Handler]]]:
        return dict(self._entries)
