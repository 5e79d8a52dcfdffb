"""Checks: one module per check, each with SECTION, Config and build().

See filterd/checks/base.py for the contract.
"""
