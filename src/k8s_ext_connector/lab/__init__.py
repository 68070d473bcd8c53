"""Network-namespace labs: the test topology, the benchmark's, and ``k8s-ext-connector lab``."""
