"""Machinery shared by every pruning dimension: masks, registries, allocation, calibration, configs."""
