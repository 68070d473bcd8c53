"""The kopf operator (not built yet: issue #3).

It will watch ExternalServices and run ``core.planner.plan`` to write the sidecar and
gateway configs that ``sidecar`` and ``gateway`` already consume.
"""
