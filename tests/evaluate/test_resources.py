"""Peak memory figures belong to the process that reports them."""

import subprocess
import sys

import numpy as np

from prunekit.evaluate.resources import Measured, process_peak_rss


def test_a_child_does_not_inherit_its_parents_peak():
    ballast = np.ones(2 * 2**30 // 8)  # 2 GiB, touched, in this (the parent) process
    assert process_peak_rss() >= ballast.nbytes
    code = "from prunekit.evaluate.resources import process_peak_rss; print(process_peak_rss())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < ballast.nbytes // 2


def test_measured_sees_a_step_that_allocates():
    with Measured(interval=0.005) as measured:
        block = np.ones(256 * 2**20 // 8)
        block[::4096] += 1
    assert measured.peak_rss >= block.nbytes and measured.seconds > 0
