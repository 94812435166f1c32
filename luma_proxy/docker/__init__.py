"""The Docker engine's socket, when mounted: a route's networks recorded and
rejoined (engine), containers stopping and gone before DNS says so (events).
"""
