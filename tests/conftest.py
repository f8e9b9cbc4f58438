"""Suite-wide pytest settings: the `slow` marker (multi-host and SLURM proofs; CI runs them,
`pytest -m "not slow"` skips them locally)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: minutes-long proofs on real hosts / a real SLURM (deselect with "
        "-m \"not slow\")")
