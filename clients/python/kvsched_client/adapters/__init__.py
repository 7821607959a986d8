"""Engine integrations (each imports its engine lazily; install the matching extra)."""
