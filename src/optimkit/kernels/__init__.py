"""Hand-written fast paths for hot (optimizer, precision, device) combinations.

Each fast path computes exactly what the plain tensor-op path computes
(decode -> rule -> encode) and is tested against it; the facade uses it when
its conditions hold and falls back to the reference path otherwise.
"""
