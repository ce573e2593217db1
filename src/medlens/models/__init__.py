"""Everything about models: loading any model (`loading.load_model`, through its table of sources), describing it
(`metadata.build_description`, stored as one `ModelDescription` read with `medlens.core.model_description.describe`),
and the models medlens ships.

Layout: loading (load_model and SOURCES), source (the contract of a source), zoo (bundled models), model_files
(TorchScript, .pt2, pickled modules, paths), library (torchvision:/timm: by name; torchvision_tasks: its segmentation and detection builders), monai_nets
(monai: by name, arguments from the sidecar), xrv (TorchXRayVision), state_dicts
(weights files), sidecar (sidecar JSON and field checks), metadata (the description in steps), probe (the probe
pass), networks (the bundled models' network classes).
"""
