"""The HTTP API worker: a Quart-Trio app served by Hypercorn's trio worker."""
