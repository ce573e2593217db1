"""The ground floor: torch helpers that know nothing of methods, models or files (calling a model whatever its
form, batched target gradients, spatial axes and resizing), shared by `accel`, `core` and the method families.
"""
