"""The registry: one SQLite database (registry), the view the hot path reads,
built from it by a pure function (view), the JSON layouts it imports (gostate),
where it lives (paths) and the one atomic file write (atomic).
"""
