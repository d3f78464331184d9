"""Hosts: specs, transports, capabilities, host settings, a run's footprint."""
