"""Explanation methods, one module per family (CAM, gradients, LRP, perturbation, surrogates).

Importing a module registers its methods; the package is not named `methods` because `medlens.methods()` is the public call.
"""
