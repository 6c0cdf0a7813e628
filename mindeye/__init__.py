"""mindeye: the core every stage shares - model, CLIP embedder, NSD layout, GLM, wire protocol, metrics."""
