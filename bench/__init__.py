"""esmirror against rsync on the same work, on loopback: ``python -m bench [--quick]``.

See README "Performance" for what it measures and the last results, and
docs/performance.md for the design and the measurement log.
"""
