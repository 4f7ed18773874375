"""Automation rules: rule files, their delay policies, firing rules on recorded events, and
``nudge rules explain``."""
