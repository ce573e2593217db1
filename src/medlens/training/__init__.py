"""Training the bundled models from data with a fixed seed, and exporting their weights and model cards."""
