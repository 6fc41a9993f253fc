"""Test setup: 4 fake CPU devices for every test process, quiet logs, a compile cache."""

import os

# Must happen before JAX initialises its backends. Single-device tests use a 1-device mesh.
# Test models are tiny: XLA's CPU compile time dominates, and LLVM optimisation level 0
# compiles ~2.5x faster (measured on a train step) at no cost that matters here.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=4",
                                    "--xla_backend_optimization_level=0"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

# grain 0.2.18 workers read an absl flag; outside app.run the flags must count as parsed.
flags.FLAGS.mark_as_parsed()


# The slowest files first (seconds measured on 2 cores, cold cache), so that pytest-xdist's
# file-by-file scheduling (setup.cfg: --dist=loadfile --no-loadscope-reorder, which keeps
# this order) starts them at once and the many quick files fill in around them: the
# longest-first rule. Without it xdist orders files by their number of tests and the
# one-test memorization run (~270 s) starts last.
SLOW_FIRST = ("test_ldm_memorization.py", "test_ldm_train.py", "test_ldm_semantics.py",
              "test_audit_recall.py", "test_ldm_parity.py",
              "test_convert.py", "test_multihost.py", "test_train.py", "test_pairs_jobs.py",
              "test_caches.py", "test_cli_cases.py", "test_models.py", "test_cli_safety.py",
              "test_store_integrity.py", "test_score.py", "test_explain.py", "test_api.py",
              "test_perceptual.py", "test_bf16.py", "test_clip.py", "test_fsim.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)  # stable: the order within each file is kept
