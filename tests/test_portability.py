"""The model and smoke tests again under other CPU kernels and thread counts, as on another machine.

ATEN_CPU_CAPABILITY makes torch take the kernels of a plainer CPU (``default``: no vector extensions;
``avx2``: no AVX-512), and the thread count changes how matrix products split their sums. Every bit-for-bit
claim in those tests must hold under each, and every bound must cover it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.parametrize("capability", ["default", "avx2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_model_and_smoke_tests_pass_on_other_kernels(capability, threads):
    env = os.environ | {"ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads),
                        "MKL_NUM_THREADS": str(threads)}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert seen.stdout.split() == [capability.upper(), str(threads)], seen.stdout + seen.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        str(TESTS / "test_model.py"), str(TESTS / "test_smoke.py")],
                       env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
