"""Accelerator profiles shipped with wnplan, installed as the package `wnplan.accelerators`.

The `.toml` files in this folder are plain data, read by `wnplan.accelerator`.
"""
