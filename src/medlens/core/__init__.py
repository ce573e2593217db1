"""The engine: `explain()`, the shared explanation context, the method registry, results, targets, layers.

Everything here is torch only; methods live in `medlens.families`, file handling in `medlens.io`.
"""
