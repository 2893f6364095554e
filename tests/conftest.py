"""Shared test setup: import the repo's top-level modules, and never touch the network."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests run offline; a hub id must fail fast, not hang
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
