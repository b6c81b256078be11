"""Op handlers, one module per op family. Every module is imported here explicitly."""

from onnxprune.handlers import (  # noqa: F401
    concat,
    conv,
    elementwise,
    gemm,
    norm,
    pool,
    reshape,
    resize,
    shapeops,
)

MODULES = ("concat", "conv", "elementwise", "gemm", "norm", "pool", "reshape", "resize", "shapeops")
