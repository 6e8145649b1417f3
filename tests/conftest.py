"""Test set-up: 8 simulated CPU devices, so every sharding path runs without accelerators, and
one compilation cache for the session.

Many tests train the same tiny models in fresh processes (resume, faults, two hosts, the command
line, notebooks); JAX's persistent compilation cache, in a directory private to this session and
inherited by every subprocess, lets the second of them load the compiled steps instead of
compiling them again. The cache is keyed by the full program, so results are unchanged.
"""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="transformer-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
