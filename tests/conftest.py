"""Shared fixtures: one synthetic data root for the whole session, so the tiny dataset is generated once."""
import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reid-data"))
