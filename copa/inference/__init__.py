"""Running a model for DSPy: the local batching engine (copa.inference.engine) over a local model
(local: packed decoding, prefix cache, row-independent GEMMs), copa-started or user servers
(servers) and the run-scoped response cache (cache). torch/transformers/dspy load on import of
the submodules, never of this package."""
