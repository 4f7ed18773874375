"""Code that both sides use: services' producers (:mod:`producer`) and Nudge's workers.

The wire contract, the topology, the delay backends, the AMQP adapter and the error root live
here; what only the workers need lives in :mod:`workers`.
"""
