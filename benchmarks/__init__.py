"""Benchmarks of mtnlg against its peers, measured alternately in one process (see common.py)."""
