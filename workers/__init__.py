"""Nudge's workers and its ``nudge`` CLI: everything that runs on Nudge's side of the broker.

The roles (:mod:`workers.roles`) run on the runtime (:mod:`workers.runtime`); the domain
modules beside this file (checks, policies, templating, rate limits, unsubscribe links, dead
letters, channels, the store) are what the roles decide and record with.
"""
