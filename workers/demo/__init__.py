"""``nudge demo`` and the demo webhook receiver: the main job end to end on real servers."""
