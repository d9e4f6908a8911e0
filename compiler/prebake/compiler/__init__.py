"""Compile workers and backends (inductor, awq, neuron); arrives with issue 3."""
