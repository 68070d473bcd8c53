"""Shared core: configuration model, planner, and side-effect interfaces."""
