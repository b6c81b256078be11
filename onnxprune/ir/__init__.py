"""The I/O floor: raw protobuf. Loading and saving (with external data), tensors and constants,
the graph index (producers, consumers, subgraph references) and node attributes."""
