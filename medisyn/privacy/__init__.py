"""Sample-level differential privacy."""
