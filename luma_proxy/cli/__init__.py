"""The `luma-proxy` command (click): edits the registry the running proxy follows.
"""
