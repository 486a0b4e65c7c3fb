"""The demos behind `cicada demo`: `cold_start` (pack a reference model once, cold-start it
with every strategy) and `live` (the three roles cooperating under a burst of requests)."""
