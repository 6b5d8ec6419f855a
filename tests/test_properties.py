"""Property-based: on any tensor torch accepts, every fast path gives the reference's numbers
or its exception.  The search (tests/property_search.py, hypothesis, derandomized, a fixed
number of examples) runs in a subprocess: a crash of the process fails this test and names
the example that caused it, instead of ending the test run.

The space: optimizer (all eight) x hyper-parameters (weight-decay modes and placement, eps
placement, bias correction, momentum, Nesterov, AMSGrad, Adafactor's variants, a tensor lr)
x parameter dtype (fp32, fp64, bf16, fp16) x gradient dtype (any of those, via
``p.grad_dtype = None``) x state dtype (a state dict cast to fp32, fp64 or bf16 and loaded, or
Adam's ``state_dtype``) x shape (0-dim, zero-size dimensions, one row, one element, 3-D, 4-D,
one tensor large enough for the threaded kernels) x layout (contiguous, every other row of a
larger buffer, transposed, channels_last, expanded with stride 0, negative views) x impl
(auto, foreach, fused).  Tolerance: |a - b| <= tol max(1, |b|) after three steps, tol 1e-5 in
float32, 1e-10 in float64, 3e-2 where a bf16/fp16 tensor is involved (torch's foreach kernels
round scalars to those dtypes), exact where only the reference kernel ran in fp32/fp64.
``OPTIMLAB_PROPERTY_EXAMPLES`` sets the number of examples (default 300, about 10 s).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fast_paths_equal_the_reference_on_any_tensor():
    n = int(os.environ.get("OPTIMLAB_PROPERTY_EXAMPLES", "300"))
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.property_search", "--examples",
                               str(n)], cwd=ROOT, capture_output=True, text=True,
                              timeout=60 + n)
    except subprocess.TimeoutExpired as e:
        last = [ln for ln in (e.stderr or b"").decode(errors="replace").splitlines()
                if ln.startswith("example:")][-1:]
        raise AssertionError(f"the property search did not finish; last example: {last}")
    examples = [ln for ln in proc.stderr.splitlines() if ln.startswith("example:")]
    if proc.returncode != 0:
        crashed = proc.returncode < 0
        tail = "\n".join(ln for ln in proc.stderr.splitlines()[-40:]
                         if not ln.startswith("example:"))
        raise AssertionError(
            ("the process crashed (signal %d) on " % -proc.returncode if crashed else
             "the property failed; the last example tried was ") +
            (examples[-1] if examples else "(none)") + "\n" + tail)
    assert proc.stdout.startswith(f"ok: {n} examples"), proc.stdout
    # not vacuous: the fused kernels ran, and compared, on a fair share of the examples
    fused = sum(int(ln.split()[0]) for ln in proc.stdout.splitlines()[1:] if "fused-cpu" in ln)
    from optimlab import _ext
    if _ext.available():
        assert fused >= n // 20, proc.stdout
