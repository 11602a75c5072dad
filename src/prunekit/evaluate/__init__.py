"""Measuring what pruning bought: quality, speed, memory and size, and the reports that show it."""
