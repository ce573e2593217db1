"""CPU speed-ups for forward-only passes: BatchNorm folding, Score-CAM's precomputed stem, a steady C heap.

Each is checked against the model inside the call and can be switched off; none changes a result.
"""
