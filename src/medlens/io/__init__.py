"""Reading scans and models, preparing inputs to a model's spec, and writing results (the edges of medlens)."""
