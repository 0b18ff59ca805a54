"""esmirror against rsync on the same work, on loopback: ``python -m bench [--quick]``.

See README "Performance" for what it measures and the last results.
"""
