"""Fault-injection scenarios: the real daemon as a subprocess, faults injected from outside."""
