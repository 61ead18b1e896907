"""Test-wide settings: asyncio debug mode on every test loop."""

from __future__ import annotations

import os

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")
