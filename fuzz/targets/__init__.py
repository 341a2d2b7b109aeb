"""One module per fuzz target; each defines ``TARGET`` (a fuzz.harness.Target)."""
