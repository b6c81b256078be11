"""Op handlers, one module per op family, listed here explicitly; ``REGISTRY`` holds them all and
is what the pipeline passes to the analysis."""

from onnxprune.handlers import (
    concat,
    contrib,
    controlflow,
    conv,
    elementwise,
    gemm,
    ms_transformer,
    norm,
    pool,
    quant,
    reshape,
    resize,
    rnn,
    shapeops,
)

from onnxprune.analysis.contract import Registry

MODULES = ("concat", "contrib", "controlflow", "conv", "elementwise", "gemm", "ms_transformer", "norm", "pool", "quant", "reshape", "resize", "rnn", "shapeops")

REGISTRY = Registry.of_modules([concat, contrib, controlflow, conv, elementwise, gemm, ms_transformer, norm, pool, quant, reshape, resize, rnn, shapeops])
