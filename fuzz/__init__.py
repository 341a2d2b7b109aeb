"""Coverage-guided fuzz targets (atheris / libFuzzer) for every decoder that
takes attacker bytes. See docs/fuzzing.md; run with ``python fuzz/run.py``."""
