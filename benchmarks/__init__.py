"""The lab beside the package (not installed): latency, memory, profiling and size-stream
reports, the re-implementation of the official dense backbones that stands in for the official
code, the device check, and the helpers they share. Reached through ``tools/benchmark.py`` and
``tools/device_check.py``, and imported by the tests; nothing in :mod:`mmeformer` imports it."""
