"""The learning core: models, strategies, robust rules, merges, clustering and selection.

Pure functions over tensors (and the small state they need), free of gRPC and of the
generated protobuf modules (an import-linter contract checks it), so the services, the
in-process federation and the benchmarks share one implementation.
"""
