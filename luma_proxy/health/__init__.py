"""Health checks: the probe and the checker (checker), and the leader's
schedule that runs them and writes their results to the registry (schedule).
"""
