"""Median optimizer step time on ~8M transformer-shaped parameters, side by side.

Same as ``optimkit speed``; see optimkit/bench/speed.py for the method. ``--geometry``
times Muon, Shampoo, SOAP and PSGD-Kron (those registered), amortized over the
preconditioner refresh interval.
"""
import sys

from optimkit.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
