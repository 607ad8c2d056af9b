"""Site data: the dataset contract."""
