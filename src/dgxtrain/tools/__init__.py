"""Entry points of their own: the benchmark, the doctor, the report."""
