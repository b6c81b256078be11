"""The runtime floor, the only importer of onnxruntime: sessions and execution providers,
generated inputs, probes that run a model to read shapes and values, and the machine's facts."""
