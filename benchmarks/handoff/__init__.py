"""The handoff benchmark (`python3 -m benchmarks.handoff`): see __main__.py."""
