"""The models medlens ships: architectures, committed weights with model cards, and the zoo that loads them.

`zoo.load_bundled(name)` returns a model in eval mode carrying `.labels`, `.multi_label` and `.input_spec`.
"""
