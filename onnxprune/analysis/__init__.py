"""The analysis floor: the handler contract (roles, contexts, registry), shapes, the normalization
passes and the coupling graph. Pure: a model is never mutated here unless the caller owns it."""
