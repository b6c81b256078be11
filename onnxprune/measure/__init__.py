"""The measuring floor: verification against the masked original, latency (interleaved), model
statistics (MACs from the handlers), the searches for MAC and latency targets, and sweeps."""
