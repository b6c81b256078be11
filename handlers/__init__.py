"""Op handlers, one module per op family. Every module is imported here explicitly."""

from onnxprune.handlers import (  # noqa: F401
    concat,
    contrib,
    conv,
    elementwise,
    gemm,
    norm,
    pool,
    reshape,
    resize,
    rnn,
    shapeops,
)

MODULES = ("concat", "contrib", "conv", "elementwise", "gemm", "norm", "pool", "reshape", "resize", "rnn", "shapeops")
