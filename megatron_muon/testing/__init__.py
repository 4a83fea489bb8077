"""Test support that ships with the package so users can run the same multi-rank checks on their machines."""
