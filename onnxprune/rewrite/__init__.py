"""The rewrite floor: apply a plan (functional: a new model), then check the result with the full
ONNX checker and against the shapes the plan predicts."""
