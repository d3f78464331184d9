"""Where things live on the controller: the checkout's fixtures, the user's cache, the lab's state.

A leaf module: every layer may ask it, it asks no one.
"""
from __future__ import annotations

import os
from pathlib import Path


def fixtures_dir() -> Path:
    """Where image recipes and example inventories live (``fixtures/`` of the checkout)."""
    env = os.environ.get("KVMCHECK_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "fixtures"


def cache_dir() -> Path:
    """Built images, probe results and the lab: ``$KVMCHECK_CACHE`` or ``~/.cache/pytest-kvmcheck``."""
    base = os.environ.get("KVMCHECK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pytest-kvmcheck")
    return Path(base)


def machine_locks_dir() -> Path:
    """The machines' locks (machines.py): in the user's cache, so that every run of this user on
    this controller sees them, not only the run's own workers."""
    return cache_dir() / "machines"


def lab_dir() -> Path:
    """The lab's state: its key, known_hosts, inventory and each host's QEMU files."""
    return Path(os.environ.get("KVMCHECK_LAB_DIR") or cache_dir() / "lab")


def lab_inventory() -> Path:
    """What ``--kvm-hosts=lab`` reads, written by ``kvmcheck lab up``."""
    return lab_dir() / "inventory.toml"
