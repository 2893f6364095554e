"""Shared test setup: import the repo's top-level modules, and never touch the network."""

import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests run offline; a hub id must fail fast, not hang
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def micro_root(tmp_path_factory):
    """A micro demo dataset: 16 training tiles, 2 val tiles (the generator of `python train.py`)."""
    from plumbing.demo import prepare_demo

    root = str(tmp_path_factory.mktemp("demo"))
    prepare_demo(root, seed=0, n_train=16, n_val=2)
    return root
