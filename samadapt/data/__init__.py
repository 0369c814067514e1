"""Data pipeline: readers -> cases -> intensity preprocessing -> 2D slices -> (embedding cache) -> batches.

A reader never knows about methods; a method never reads files. See ``docs/data.md`` for the formats.
"""
