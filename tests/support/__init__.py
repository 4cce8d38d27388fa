"""Helpers shared by the unit, integration and end-to-end tests."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "qemu_configs"
