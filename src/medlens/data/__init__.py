"""Datasets medlens trains and checks on: the figshare brain-tumour MRI loader and the synthetic lesion phantoms.

Nothing here downloads anything: the figshare loader reads a folder the user points it at.
"""
